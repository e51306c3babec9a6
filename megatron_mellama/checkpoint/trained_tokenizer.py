"""The tokenizer a checkpoint was trained with, and the check that a tool pairs it with that one.

Every save records the run's tokenizer in `train_state.json` (`data.tokenizer_model`, the path as
given, and `data.tokenizer_sha256`, see `data.identity.tokenizer_hash`). A model exported or scored with
another tokenizer reads other ids: its embeddings are looked up for the wrong pieces, and nothing
fails; an accuracy of 0.0 or a model that writes garbage is all that shows. `check_tokenizer`
refuses such a pairing in one line naming both (the export, the standalone evaluation, a --finetune
run); `--allow-tokenizer-mismatch` skips it. A checkpoint that records no tokenizer (imported from
Hugging Face, or trained on --mock-data without one) is not checked.
"""

from __future__ import annotations

import json
import os
import re

from ..config import Config
from ..data.identity import tokenizer_hash
from .layout import TRAIN_STATE, CheckpointError
from .resume import checkpoint_to_load

OVERRIDE = "--allow-tokenizer-mismatch"
# inside a tokenizer folder, the files that are a whole tokenizer by themselves
_MODEL_FILES = re.compile(r"^(.*\.model|tokenizer\.json)$")


def check_tokenizer_file(path: str, flag: str = "--tokenizer-model") -> None:
    """A SentencePiece model file is expected at `path`: a folder or a missing path is one line."""
    if os.path.isdir(path):
        inside = os.path.join(path, "tokenizer.model")
        hint = f" (it holds {inside})" if os.path.isfile(inside) else ""
        raise CheckpointError(f"{flag} {path}: is a directory; expected the SentencePiece tokenizer .model "
                              f"file{hint}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{flag} {path}: no such file")


def recorded_tokenizer(ckpt: str) -> tuple[str | None, str | None]:
    """(the tokenizer path the run gave, its sha256) as checkpoint `ckpt` records them; (None, None)
    when it records none or its train state cannot be read (the tools report that themselves)."""
    try:
        with open(os.path.join(ckpt, TRAIN_STATE), encoding="utf-8") as fh:
            data = json.load(fh).get("data")
    except (OSError, ValueError, AttributeError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    return data.get("tokenizer_model"), data.get("tokenizer_sha256")


def _digests(path: str | None) -> set[str]:
    """The sha256 of `path` as a whole, and, for a folder, of each tokenizer model file in it: the
    same tokenizer given as a Hugging Face folder and as its tokenizer.model matches either way."""
    if not path:
        return set()
    found = {tokenizer_hash(path)}
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            if _MODEL_FILES.match(name):
                found.add(tokenizer_hash(os.path.join(path, name)))
    return found - {None}


def check_tokenizer(ckpt: str, path: str, flag: str = "--tokenizer-model") -> None:
    """Raise CheckpointError (one line) when the tokenizer at `path` is not the one `ckpt` was
    trained with."""
    trained_path, trained_sha = recorded_tokenizer(ckpt)
    ours = tokenizer_hash(path)
    if not trained_sha or ours is None or ours == trained_sha:
        return
    theirs = {trained_sha} | _digests(trained_path if trained_path and os.path.exists(trained_path) else None)
    if _digests(path) & theirs:
        return
    raise CheckpointError(f"{flag} {path} (sha256 {ours[:12]}) is not the tokenizer {ckpt} was trained with: "
                          f"{trained_path} (sha256 {trained_sha[:12]}); another tokenizer reads other ids. Give "
                          f"that one, or pass {OVERRIDE} if both hold the same vocabulary")


def check_finetune_tokenizer(cfg: Config) -> None:
    """A --finetune run reads the checkpoint's weights with its own --tokenizer-model: refuse one
    other than the checkpoint's, before any work (a resume compares it with the rest of the data
    settings, `data.identity.data_differences`)."""
    c = cfg.checkpoint
    if not (c.finetune and c.load and cfg.data.tokenizer_model) or c.allow_tokenizer_mismatch:
        return
    ckpt = checkpoint_to_load(cfg)
    if ckpt is not None:
        check_tokenizer(ckpt, cfg.data.tokenizer_model)
