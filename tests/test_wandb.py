"""--wandb-project: a tiny run in W&B's offline mode writes the TensorBoard scalars, under the same tags
and values, and the run's configuration to its offline run file (read back here); a resumed run
continues the same W&B run; a missing wandb package is a one-line error naming the extra."""

import glob
import json
import os
import struct
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_mellama.pretrain import main

wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

RUN = ["--model", "tiny", "--mock-data", "--vocab-size", "128", "--seq-length", "16", "--num-layers", "2",
       "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "2", "--eval-interval", "2",
       "--num-workers", "0", "--log-interval", "1", "--train-iters", "6", "--save-interval", "2",
       "--wandb-project", "mellama-tests", "--wandb-exp-name", "tiny"]


# -- W&B's offline run file ------------------------------------------------------------------------
# A `.wandb` file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB
# blocks of chunks, each a 7-byte header (CRC32, little-endian length, type: 1 full, 2 first,
# 3 middle, 4 last) and its bytes; a record is one full chunk or first..last; each record is a
# serialised `wandb_internal_pb2.Record`.
BLOCK, HEADER = 32 * 1024, 7


def read_records(path: str) -> list:
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pending += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_run(save_dir: str, run_id: str | None = None) -> dict:
    """The newest offline run under `save_dir` (of `run_id`): its id, config and {step: {tag: value}}."""
    pattern = f"offline-run-*-{run_id or '*'}"
    paths = sorted(glob.glob(os.path.join(save_dir, "wandb", pattern, "run-*.wandb")))
    assert paths, f"no offline W&B run under {save_dir}"
    run = dict(id=None, config={}, history={})
    for record in read_records(paths[-1]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            run["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            run["history"].setdefault(row["_step"], {}).update(row)
    return run


def offline_run_written(save_dir: str, last_step: int, run_id: str | None = None, timeout: float = 60.0) -> dict:
    """`offline_run` once W&B's service process has written the run record and the step `last_step`:
    `finish()` can return before that file is complete on a loaded machine (seen in a CI-like run)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            run = offline_run(save_dir, run_id)
        except Exception:  # a record cut short by the writer: read again
            if time.monotonic() > deadline:
                raise
        else:
            if (run["id"] and last_step in run["history"]) or time.monotonic() > deadline:
                return run
        time.sleep(0.5)


def tensorboard_scalars(directory: str) -> dict:
    """{tag: {step: value}} of the TensorBoard event files in `directory`."""
    events = EventAccumulator(directory, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch to iteration 4 (--exit-interval), then its resume to iteration 6, offline."""
    root = tmp_path_factory.mktemp("wandb")
    paths = {name: str(root / name) for name in ("save", "wandb", "tb", "log.jsonl", "wandb-home")}
    flags = RUN + ["--save", paths["save"], "--load", paths["save"], "--wandb-save-dir", paths["wandb"],
                   "--tensorboard-dir", paths["tb"], "--log-file", paths["log.jsonl"]]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        # W&B's own settings and caches stay inside the test's folder
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, paths["wandb-home"])
        assert main(flags + ["--exit-interval", "4"]) == 0
        first = offline_run_written(paths["wandb"], 4)
        with open(os.path.join(paths["save"], "iter_0000004", "train_state.json")) as fh:
            kept = json.load(fh)["extra"].get("wandb_run_id")
        assert main(flags) == 0
    log = [json.loads(line) for line in open(paths["log.jsonl"])]
    return dict(paths=paths, first=first, kept=kept, resumed=offline_run_written(paths["wandb"], 6, first["id"]),
                log=log)


def test_the_offline_run_holds_the_tensorboard_scalars_under_the_same_tags(runs):
    tensorboard = tensorboard_scalars(runs["paths"]["tb"])
    history = {**runs["first"]["history"], **runs["resumed"]["history"]}
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    assert {"lm loss", "learning-rate", "grad-norm", "lm loss validation", "lm loss vs samples"} <= set(tensorboard)
    for tag, points in tensorboard.items():
        for step, value in points.items():
            if tag.endswith(" vs samples"):  # TensorBoard's step is the consumed samples: W&B's `samples vs steps`
                row = next(r for r in history.values() if r.get("samples vs steps") == step and tag in r)
            else:
                row = history[step]
            assert row[tag] == pytest.approx(value, rel=1e-6), (tag, step)  # TensorBoard keeps float32


def test_lm_loss_at_the_last_iteration_equals_the_json_logs(runs):
    last = [r for r in runs["log"] if "lm_loss" in r][-1]
    assert last["iteration"] == 6
    assert runs["resumed"]["history"][6]["lm loss"] == last["lm_loss"]
    assert runs["first"]["history"][4]["lm loss"] == [r for r in runs["log"] if r.get("iteration") == 4][0]["lm_loss"]


def test_the_run_configuration_is_recorded(runs):
    config = runs["first"]["config"]
    assert config["train"]["train_iters"] == 6 and config["train"]["global_batch_size"] == 4
    assert config["logging"]["wandb_project"] == "mellama-tests" and config["preset"] == "tiny"


def test_a_resumed_run_continues_the_same_wandb_run(runs):
    assert runs["kept"] == runs["first"]["id"] == runs["resumed"]["id"]
    assert sorted(runs["resumed"]["history"]) == [5, 6]
    assert len(glob.glob(os.path.join(runs["paths"]["wandb"], "wandb", "offline-run-*"))) == 2


def test_a_missing_wandb_package_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    assert main(RUN + ["--wandb-save-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install -e ".[wandb]"' in err and "--wandb-project" in err
    assert not os.listdir(tmp_path)

    from megatron_mellama.config import ConfigError
    from megatron_mellama.training.wandb_writer import import_wandb

    with pytest.raises(ConfigError, match=r'pip install -e "\.\[wandb\]"'):
        import_wandb()
