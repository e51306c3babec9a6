"""Weights & Biases (`--wandb-project`): the scalars `metrics.MetricsLogger` writes to TensorBoard,
under the same tags, from the same rank (global rank 0), with Megatron-LM's flag names.

- Each `... vs samples` twin TensorBoard steps by consumed samples is plotted here against the
  `samples vs steps` metric (Megatron-LM's name for the consumed-sample count), since a W&B run
  has one step counter: the iteration.
- The run's configuration is the run's `config`.
- The run id is chosen before the first log and kept in every checkpoint (`checkpoint_extra`), so
  a resumed run passes it back with `resume="allow"` and continues the same W&B run. Iterations
  logged after the newest checkpoint and before a preemption are logged again by the resumed run;
  W&B keeps the first values of a step it already has.
- `WANDB_MODE=offline` writes the run under `--wandb-save-dir` only (`wandb sync` uploads it).
- `wandb` is imported when the first scalar is logged, on rank 0 only; `config/validate.py` has
  already refused a run that asks for W&B without the package.
"""

from __future__ import annotations

import dataclasses
import os
import secrets

from ..config.errors import ConfigError
from ..config.validate import WANDB_MISSING

SAMPLES_METRIC = "samples vs steps"
CHECKPOINT_KEY = "wandb_run_id"


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError(WANDB_MISSING) from None
    return wandb


def save_dir(cfg) -> str:
    if cfg.logging.wandb_save_dir:
        return cfg.logging.wandb_save_dir
    return os.path.join(cfg.checkpoint.save, "wandb") if cfg.checkpoint.save else "wandb"


class WandbWriter:
    def __init__(self, cfg, run_id: str | None = None):
        """`run_id`: the id a resumed run's checkpoint kept; a new run draws one."""
        self.cfg = cfg
        # W&B's own ids are 8 characters of [a-z0-9]; drawn here so a checkpoint saved before the
        # first log already holds it
        self.run_id = run_id or secrets.token_hex(4)
        self._run = None
        self._defined: set[str] = set()

    def checkpoint_extra(self) -> dict:
        return {CHECKPOINT_KEY: self.run_id}

    def _started(self):
        if self._run is None:
            wandb = import_wandb()
            g = self.cfg.logging
            directory = save_dir(self.cfg)
            os.makedirs(directory, exist_ok=True)
            self._run = wandb.init(project=g.wandb_project, entity=g.wandb_entity, name=g.wandb_exp_name,
                                   dir=directory, id=self.run_id, resume="allow",
                                   config=dict(dataclasses.asdict(self.cfg), preset=self.cfg.preset))
            self._run.define_metric(SAMPLES_METRIC)
        return self._run

    def log(self, values: dict[str, float], iteration: int, consumed_samples: int,
            vs_samples: tuple[str, ...] = ()) -> None:
        run = self._started()
        row = dict(values)
        for tag in vs_samples:
            if tag in values:
                twin = f"{tag} vs samples"
                if twin not in self._defined:
                    run.define_metric(twin, step_metric=SAMPLES_METRIC)
                    self._defined.add(twin)
                row[twin] = values[tag]
        if vs_samples:
            row[SAMPLES_METRIC] = consumed_samples
        # rows of one iteration (train log, validation, reports) merge into one step
        run.log(row, step=iteration)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
