"""A checkpoint's recorded model values that a run which did not set them takes over."""

from __future__ import annotations

from ..config import Config
from .manager import CheckpointError, read_train_state

# what the same weights compute depends on these too; a run that does not set them (by flag or
# YAML; a preset's value is a default) takes the checkpoint's, where the shapes must match anyway
ADOPTED_VALUES = (("norm_epsilon", "--norm-epsilon"), ("rotary_base", "--rotary-base"))


def adopt_checkpoint_values(cfg: Config, ckpt: str) -> list[str]:
    """Set `cfg.model`'s RMSNorm epsilon and RoPE base to the values checkpoint `ckpt` recorded,
    where this run did not set them; returns a line per value changed. Call it before the engine
    is built (the rotary tables follow the base). An unreadable train state is left to `load`."""
    try:
        recorded = read_train_state(ckpt)["config"]["model"]
    except CheckpointError:
        return []
    given = getattr(cfg, "given_flags", None)
    if given is None:  # not from parse_config: what was set is unknown, so nothing is taken
        return []
    lines = []
    for name, flag in ADOPTED_VALUES:
        value = recorded.get(name) if isinstance(recorded, dict) else None
        if f"model.{name}" in given or value is None or value == getattr(cfg.model, name):
            continue
        lines.append(f"{flag} {value}: the checkpoint's value (this run did not set {flag}; "
                     f"it would have used {getattr(cfg.model, name)})")
        setattr(cfg.model, name, value)
    return lines
