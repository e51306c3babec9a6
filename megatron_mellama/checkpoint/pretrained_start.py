"""Megatron-LM's `--pretrained-checkpoint`: where a run starts, decided at each launch.

A continual-pretraining or instruction-tuning job is launched many times with one command line
(a requeue after preemption or a time limit, a restart after a crash). The first launch must start
from the pretrained weights as `--finetune` does (weights only, iteration 0); every later one must
resume its own checkpoints in `--load` (default `--save`). With `--finetune --load PRE` on the
command line the second launch would start over from PRE, and is refused by the `--save` guard;
with `--pretrained-checkpoint PRE --load OWN` each launch takes the right one by itself.
"""

from __future__ import annotations

from ..config import Config
from .layout import CheckpointError, latest_iteration


def resolve_start(cfg: Config) -> str | None:
    """Set --load/--finetune of this launch from --pretrained-checkpoint; returns the line that says
    which start was taken (None without --pretrained-checkpoint). Reads only `latest` files."""
    c = cfg.checkpoint
    if not c.pretrained_checkpoint:
        return None
    c.load = c.load or c.save
    if not c.load:
        raise CheckpointError("--pretrained-checkpoint needs --save (or --load): the directory whose own "
                              "checkpoints later launches resume")
    own = latest_iteration(c.load)
    if own is not None:
        # a resume continues what that run trained with: its positions and its weights' history
        c.finetune = c.extend_context = False
        return (f"--load {c.load} holds iteration {own}: resuming it (--pretrained-checkpoint "
                f"{c.pretrained_checkpoint} is read only while --load holds no checkpoint)")
    if latest_iteration(c.pretrained_checkpoint) is None:
        raise CheckpointError(f"--pretrained-checkpoint {c.pretrained_checkpoint}: no checkpoint there (no "
                              "'latest' file; checkpoints_convert/hf_to_mellama.py makes one from Hugging Face)")
    c.load, c.finetune = c.pretrained_checkpoint, True
    return (f"--load holds no checkpoint yet: starting from --pretrained-checkpoint {c.load} "
            "(weights only, iteration 0, as --finetune)")
