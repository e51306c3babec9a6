"""What a training run left, read back as {metric: {iteration: value}}, from either of its two forms.

A run is its `--log-file` (JSON lines, one record per line, see training/metrics.py) or its
`--tensorboard-dir` (a folder of event files). Both read back under the TensorBoard tags, which are
Megatron-LM's: `lm loss`, `learning-rate`, `grad-norm`, `throughput`, `tokens-per-sec`, `mfu`,
`memory`, `iteration-time`, `params-norm`, `num-zeros`, `lm loss validation` and
`lm loss validation/<domain>` (and their `ppl`), `downstream/<task>/acc` and `acc_norm`,
`consumed samples/<domain>`, `lm loss/<domain>` (the training loss per domain). The `... vs samples`
twins are stepped by samples, not iterations, and are left out.

The two forms differ only where the writer made them differ: TensorBoard holds float32 values and
also `batch-size` (and `loss-scale` with fp16); the JSON log's non-finite losses are null, read
back as NaN, as TensorBoard holds them.

A run that went back (resumed from an older checkpoint than its last log, or rolled back after a
spike) logs some iterations twice. In both forms the later record wins and drops that metric's
values from its iteration on: a curve is the history the run kept, never a mix of the two.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from ..errors import MellamaError
from ..training import timers
from ..training.jobs.straggler_report import report_scalars

# a training record's keys and their TensorBoard tags
TRAIN_TAGS = {"lm_loss": "lm loss", "lr": "learning-rate", "grad_norm": "grad-norm",
              "iteration_time_s": "iteration-time", "tflops_per_device": "throughput",
              "tokens_per_sec": "tokens-per-sec", "mfu": "mfu", "memory_gib": "memory",
              "params_norm": "params-norm", "num_zeros": "num-zeros"}
# null in these means "not measured here" (MFU off a known GPU, memory off POSIX): TensorBoard has
# no point there; null in the others is a non-finite value, a NaN point in TensorBoard
NOT_MEASURED_WHEN_NULL = {"mfu", "memory_gib"}
# a periodic job's report record (`{name: record}` in the JSON log) and its TensorBoard scalars
REPORT_SCALARS = {"straggler": report_scalars, "timers": timers.report_scalars}
BY_SAMPLES = " vs samples"


class RunLogError(MellamaError, ValueError):
    """A path that is not a run's JSON log or TensorBoard folder; the message names the path (and line)."""


@dataclass
class Run:
    path: str
    form: str  # "json" or "tensorboard"
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)
    _last: dict[str, int] = field(default_factory=dict, repr=False)  # each metric's latest iteration

    @property
    def iterations(self) -> list[int]:
        return sorted({i for values in self.metrics.values() for i in values})

    def put(self, metric: str, iteration: int, value) -> None:
        values = self.metrics.setdefault(metric, {})
        if iteration <= self._last.get(metric, iteration - 1):
            for later in [i for i in values if i >= iteration]:
                del values[later]
        values[iteration] = math.nan if value is None else float(value)
        self._last[metric] = iteration


def read_run(path: str) -> Run:
    """The run at `path`: a TensorBoard folder or a JSON-lines log file."""
    if os.path.isdir(path):
        return read_tensorboard(path)
    if not os.path.isfile(path):
        raise RunLogError(f"{path}: no such file or folder")
    return read_json_log(path)


# -- the JSON log -----------------------------------------------------------------------------------
def read_json_log(path: str) -> Run:
    run = Run(path, "json")
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    _read_record(run, _parse(path, number, line), f"{path}:{number}")
    except UnicodeDecodeError:
        raise RunLogError(f"{path}: not text: not a run's --log-file") from None
    if not run.metrics:
        raise RunLogError(f"{path}: no training, validation or downstream records: not a run's --log-file")
    return run


def _parse(path: str, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise RunLogError(f"{path}:{number}: not a JSON object ({e.msg}): not a run's --log-file") from None
    if not isinstance(record, dict):
        raise RunLogError(f"{path}:{number}: a JSON {type(record).__name__}, not an object: not a run's --log-file")
    return record


def _read_record(run: Run, record: dict, where: str) -> None:
    iteration = record.get("iteration")
    if not isinstance(iteration, int) or isinstance(iteration, bool):
        raise RunLogError(f"{where}: no integer 'iteration': not a record of a run's --log-file")
    try:
        if "lm_loss" in record:
            _read_training(run, iteration, record)
        for name, losses in record.get("eval", {}).items():
            suffix = "" if name == "all" else f"/{name}"
            run.put(f"lm loss validation{suffix}", iteration, losses["lm_loss"])
            run.put(f"lm loss validation ppl{suffix}", iteration, losses["ppl"])
        for task, scores in record.get("downstream", {}).items():
            for key in ("acc", "acc_norm"):
                run.put(f"downstream/{task}/{key}", iteration, scores[key])
        for name, scalars in REPORT_SCALARS.items():
            if name in record:
                for tag, value in scalars(record[name]).items():
                    run.put(tag, iteration, value)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise RunLogError(f"{where}: a record without the fields training writes ({type(e).__name__}: {e})") from None


def _read_training(run: Run, iteration: int, record: dict) -> None:
    for key, tag in TRAIN_TAGS.items():
        if key in record and not (record[key] is None and key in NOT_MEASURED_WHEN_NULL):
            run.put(tag, iteration, record[key])
    for name, count in record.get("consumed_samples_per_domain", {}).items():
        run.put(f"consumed samples/{name}", iteration, count)
    for name, loss in record.get("loss_per_domain", {}).items():
        run.put(f"lm loss/{name}", iteration, loss)


# -- the TensorBoard folder -------------------------------------------------------------------------
def read_tensorboard(path: str) -> Run:
    # imported here: tensorboard takes seconds to import, and a JSON log does not need it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not any(name.startswith("events.out.tfevents") for name in os.listdir(path)):
        raise RunLogError(f"{path}: a folder without TensorBoard event files: not a run's --tensorboard-dir")
    events = EventAccumulator(path, size_guidance={"scalars": 0})  # 0: every point, not a sample of them
    try:
        events.Reload()
    except Exception as e:  # the reader's own errors (a damaged file) have no common base
        raise RunLogError(f"{path}: unreadable TensorBoard events ({type(e).__name__}: {e})") from None
    run = Run(path, "tensorboard")
    for tag in events.Tags()["scalars"]:
        if not tag.endswith(BY_SAMPLES):
            for event in events.Scalars(tag):
                run.put(tag, event.step, event.value)
    if not run.metrics:
        raise RunLogError(f"{path}: no scalars in its TensorBoard events: not a run's --tensorboard-dir")
    return run
