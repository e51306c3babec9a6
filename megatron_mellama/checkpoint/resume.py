"""Which checkpoint a run resumes from, and whether this run may resume it.

A load refuses, each with one line: a --load that finds no checkpoint (but the first launch of
`--save X --load X`), architecture flags that differ from the checkpoint's, on resume data
settings that differ (split, seed, sequence length, tokenizer, the files of a prefix it read: the
data positions would index another sample sequence; data/identity.py compares them), and a file
that does not match its checksum.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from ..config import Config, ModelConfig
from ..data.identity import data_differences, data_notes
from ..model import rope
from .layout import ITER_DIR, LATEST, CheckpointError, checkpoint_dir, latest_iteration

# What the model computes follows from: (flag, the ModelConfig fields it needs in the saved
# config, value of a ModelConfig). The shapes, and the two values that change the function of the
# same weights (RMSNorm's epsilon and RoPE's base). A value an older checkpoint did not record is
# not compared.
_ARCH_FLAGS = (
    ("--num-layers", ("num_layers",), lambda m: m.num_layers),
    ("--hidden-size", ("hidden_size",), lambda m: m.hidden_size),
    ("--num-attention-heads", ("num_attention_heads",), lambda m: m.num_attention_heads),
    ("--num-query-groups", ("num_attention_heads",), lambda m: m.kv_heads),
    ("--ffn-hidden-size", ("hidden_size",), lambda m: m.ffn_size),
    ("--vocab-size (padded)", ("vocab_size",), lambda m: m.padded_vocab_size),
    ("--norm-epsilon", ("norm_epsilon",), lambda m: m.norm_epsilon),
    ("--rotary-base", ("rotary_base",), lambda m: m.rotary_base),
    # an older checkpoint records no scaling: its defaults are the plain RoPE it was trained with
    ("RoPE scaling", (), rope.describe),
)
# The values that place tokens (RoPE and its tables), which --finetune --extend-context may change
_POSITION_FLAGS = frozenset({"--rotary-base", "RoPE scaling", "--max-position-embeddings"})


def _same_path(a: str | None, b: str | None) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def checkpoint_to_load(cfg: Config, path: str | None = None) -> str | None:
    """The checkpoint directory `CheckpointManager.load(path)` reads (default --load), or None when
    the run starts from scratch; raises CheckpointError where `load` would. Reads no tensor.

    Starting from scratch with a --load is only Megatron-LM's first launch of `--save X --load X`:
    X missing or holding no checkpoint yet, and the same directory as --save, without --finetune.
    Any other --load that finds no checkpoint is an error (a typo must not train from random weights).

    Every load reads every weight of the model (resume and --finetune alike, strictly: a weight the
    checkpoint lacks is an error), so a run for which this names a directory can build its engine
    with `initialise=False` and pass the directory to `load`.
    """
    root = path or cfg.checkpoint.load
    if not root:
        return None
    first_launch = _same_path(root, cfg.checkpoint.save) and not cfg.checkpoint.finetune
    if not os.path.isdir(root):
        if first_launch and not os.path.exists(root):
            return None
        raise CheckpointError(f"--load {root}: no such directory")
    iteration = latest_iteration(root)
    if iteration is not None:
        ckpt = checkpoint_dir(root, iteration)
        if not os.path.isdir(ckpt):
            raise CheckpointError(f"{os.path.join(root, LATEST)} names iteration {iteration} but {ckpt} "
                                  "does not exist")
        return ckpt
    if os.path.isfile(os.path.join(root, ".metadata")):
        return root  # an iteration directory given directly
    saved = sorted(n for n in os.listdir(root) if ITER_DIR.match(n))
    if saved:
        raise CheckpointError(f"--load {root}: no '{LATEST}' file, but it holds {', '.join(saved[-3:])}: "
                              f"point --load at one of them, or write its iteration into {root}/{LATEST}")
    if first_launch:
        return None
    why = ("--finetune needs a checkpoint to start from" if cfg.checkpoint.finetune else
           "only the first launch of --save X --load X (the same directory) starts from scratch")
    raise CheckpointError(f"--load {root}: no checkpoint there (no '{LATEST}' file); {why}")


def check_model(cfg: Config, saved: dict, ckpt: str, say: Callable[[str], None]) -> None:
    """Every architecture value the checkpoint recorded must equal this run's: one line naming
    each flag that differs and both values. Under --finetune, --max-position-embeddings (the
    length of the rotary tables, no weight) may be shorter than the checkpoint's; with
    --finetune --extend-context the position values (`_POSITION_FLAGS`: RoPE base, RoPE scaling,
    the tables' length) may differ, as LLaMA2-Long changed them (base 10,000 -> 500,000, longer
    sequences); they are no weight. On a resume they must match."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    recorded = {k: v for k, v in saved["config"]["model"].items() if k in names}
    theirs = ModelConfig(**recorded)
    ours = cfg.model
    diffs = {flag: f"{flag} {get(ours)} but the checkpoint has {get(theirs)}"
             for flag, needs, get in _ARCH_FLAGS if all(n in recorded for n in needs) and get(ours) != get(theirs)}
    theirs_max, ours_max = recorded.get("max_position_embeddings"), ours.max_position_embeddings
    if theirs_max is not None and ours_max != theirs_max:
        diffs["--max-position-embeddings"] = f"--max-position-embeddings {ours_max} but the checkpoint has {theirs_max}"
    c = cfg.checkpoint
    extension = [flag for flag in diffs if flag in _POSITION_FLAGS] if c.finetune and c.extend_context else []
    if extension:
        say(f"extending the context of {ckpt} (--finetune --extend-context): "
            + "; ".join(diffs.pop(flag) for flag in extension))
    elif c.finetune and theirs_max is not None and ours_max < theirs_max:
        # shorter rotary tables hold no weight: a --finetune may train on shorter sequences
        diffs.pop("--max-position-embeddings")
    if diffs:
        hint = ""
        if not c.extend_context and any(flag in _POSITION_FLAGS for flag in diffs):
            hint = " (a new run that changes the positions on purpose: --finetune --extend-context)"
        raise CheckpointError(f"{ckpt}: the model flags do not match the checkpoint: "
                              f"{'; '.join(diffs.values())}{hint}")


def check_data(saved: dict, this_run: Callable[[], dict], ckpt: str, say: Callable[[str], None]) -> None:
    """On resume: the data settings `consumed_samples` indexes must be the checkpoint's (a
    checkpoint from before they were recorded is not checked). `this_run()` gives this run's
    `data_identity` (it hashes files: only called when there is a record to compare it with);
    data/identity.py compares the two."""
    if not isinstance(saved.get("data"), dict):
        return
    ours = this_run()
    for line in data_notes(saved["data"], ours):
        say(f"{ckpt}: {line}")
    diffs = data_differences(saved["data"], ours)
    if diffs:
        raise CheckpointError(f"{ckpt}: the data settings differ from the run that saved it, so its "
                              f"{saved['consumed_samples']} consumed samples would index another sample "
                              f"sequence: {'; '.join(diffs)} (--finetune starts a new run from its weights)")
