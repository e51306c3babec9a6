"""The model values a checkpoint recorded, read before the run's Config is resolved
(`config.resolve` takes the ones the run did not set)."""

from __future__ import annotations

from ..config import Config
from .layout import CheckpointError, read_train_state
from .resume import checkpoint_to_load


def recorded_model_values(cfg: Config) -> dict:
    """The model section of the configuration recorded by the checkpoint `cfg` loads, {} when it
    loads none. `cfg` as given (`config.as_given`) is enough: only its --load, --save and
    --finetune are read. A checkpoint that cannot be found or read is left to `load` to report."""
    try:
        ckpt = checkpoint_to_load(cfg)
        recorded = read_train_state(ckpt)["config"]["model"] if ckpt else {}
    except (CheckpointError, OSError):
        return {}
    return recorded if isinstance(recorded, dict) else {}
