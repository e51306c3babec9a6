"""A run's data identity: what the sample sequence that `consumed_samples` indexes depends on.

A checkpoint stores `data_identity` as a record it need not understand; on resume it hands the
record back here to be compared with this run's. The split, seed, sequence length, tokenizer and
the files of a prefix it read must be the same (the data positions would index another sample
sequence otherwise). The blend's weights may change, and prefixes be added or dropped: every domain
continues its own sample order where it stopped (`data/mixture.py`; the positions are in the train
state's `extra.data_order`).
"""

from __future__ import annotations

import hashlib
import os
import re

from ..config import Config, parse_data_path, parse_split
from .index_file import index_fingerprint

# Tokenizer files of a Hugging Face tokenizer directory (which may be a whole model's folder):
# what the tokenizer hash covers.
_TOKENIZER_FILES = re.compile(r"^(tokenizer.*|vocab.*|merges\.txt|special_tokens_map\.json|added_tokens\.json|.*\.model)$")


def tokenizer_hash(path: str | None) -> str | None:
    """sha256 of the tokenizer model file (or of a tokenizer directory's tokenizer files), None
    when there is none or it cannot be read."""
    if not path:
        return None
    try:
        named = os.path.isdir(path)  # a directory's hash covers its files' names too, a file's only its bytes
        if named:
            files = sorted(f for f in os.listdir(path) if _TOKENIZER_FILES.match(f)
                           and os.path.isfile(os.path.join(path, f)))
        else:
            path, files = os.path.dirname(path), [os.path.basename(path)]
        digest = hashlib.sha256()
        for name in files:
            if named:
                digest.update(name.encode() + b"\0")
            with open(os.path.join(path, name), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


def _prefix_record(prefix: str, sft: bool) -> dict:
    """A --data-path prefix: its absolute path, the sizes of its files and the sha256 of its .idx
    (the same dataset moved elsewhere has the same name, sizes and index; data preprocessed again
    has another index even at the same sizes); for --sft, those of its token file."""
    sizes, files = {}, prefix
    if sft:
        from .sft_dataset import pair_of  # here, not above: it imports megatron.core, which a pretraining run need not

        files = pair_of(prefix)[0]
    for ext in ("bin", "idx"):
        try:
            sizes[ext] = os.path.getsize(f"{files}.{ext}")
        except OSError:
            sizes[ext] = None
    return dict(path=os.path.abspath(prefix), **sizes, idx_sha256=index_fingerprint(files))


def data_identity(cfg: Config) -> dict:
    """What the sample sequence of a run depends on: a resume (not --finetune) must find the same.
    Hashes the tokenizer and the .idx of every prefix: compute it once per run."""
    d = cfg.data
    blend = None
    if d.data_path:
        pairs = parse_data_path(d.data_path)
        total = sum(w for w, _ in pairs)
        blend = [dict(weight=w / total, **_prefix_record(p, d.sft)) for w, p in pairs]
    return dict(mock_data=bool(d.mock_data), data_path=list(d.data_path or []), blend=blend, split=d.split,
                seed=cfg.train.seed, seq_length=cfg.seq_length, tokenizer_type=d.tokenizer_type,
                tokenizer_model=d.tokenizer_model, tokenizer_sha256=tokenizer_hash(d.tokenizer_model),
                vocab_size=cfg.model.vocab_size, sft=bool(d.sft))


def _split_fractions(split: str):
    try:
        values = parse_split(split)
    except Exception:
        return split
    return [round(v / sum(values), 12) for v in values]


def _same_prefix(a: dict, b: dict) -> bool:
    """The same files, maybe moved: the same name, sizes and .idx fingerprint (where both have one:
    checkpoints written before it was recorded have none)."""
    fingerprints = (a.get("idx_sha256"), b.get("idx_sha256"))
    return (os.path.basename(a.get("path") or "") == os.path.basename(b.get("path") or "")
            and a.get("bin") is not None and (a.get("bin"), a.get("idx")) == (b.get("bin"), b.get("idx"))
            and (None in fingerprints or fingerprints[0] == fingerprints[1]))


def _counterparts(theirs: dict, ours: list, saved_paths: set) -> list:
    """This run's prefixes that may hold the data the checkpoint read as `theirs`: the one at the
    same path, else (data moved) those of the same file name that the checkpoint did not read at
    their own path. Matched by path first, so two prefixes of one file name in different folders
    (bio/text_document, clin/text_document) are each compared with themselves."""
    exact = [m for m in ours if m["path"] == theirs.get("path")]
    if exact:
        return exact
    name = os.path.basename(theirs.get("path") or "")
    return [m for m in ours if os.path.basename(m["path"]) == name and m["path"] not in saved_paths]


def data_notes(saved: dict, ours: dict) -> list[str]:
    """Lines for a resume whose data could be checked only in part."""
    blend = saved.get("blend") if isinstance(saved, dict) else None
    if blend and ours.get("blend") and any(not theirs.get("idx_sha256") for theirs in blend):
        return ["the checkpoint records no .idx fingerprint of its data (written before they were): the "
                "--data-path prefixes were checked by file name and size only"]
    return []


def _fingerprint_text(record: dict) -> str:
    digest = record.get("idx_sha256")
    return f" sha256 {digest[:12]}" if digest else ""


def data_differences(saved: dict, ours: dict) -> list[str]:
    """What changed between a checkpoint's data identity and this run's, one phrase each."""
    diffs = []
    if saved.get("mock_data") != ours["mock_data"] or bool(saved.get("blend")) != bool(ours["blend"]):
        def what(d):
            return "--mock-data" if d.get("mock_data") else f"--data-path {' '.join(d.get('data_path') or [])}"
        diffs.append(f"{what(ours)} but the checkpoint was trained on {what(saved)}")
    elif ours["blend"]:
        # Weights may change and prefixes come and go (data/mixture.py continues every domain where
        # it stopped); a prefix the checkpoint read must still hold the same data.
        saved_paths = {theirs.get("path") for theirs in saved["blend"]}
        for theirs in {t.get("path"): t for t in saved["blend"]}.values():
            candidates = _counterparts(theirs, ours["blend"], saved_paths)
            if candidates and not any(_same_prefix(theirs, mine) for mine in candidates):
                mine = candidates[0]
                diffs.append(f"--data-path {mine['path']} is not the data the checkpoint read as "
                             f"{theirs.get('path')} (.bin {mine['bin']} bytes, .idx {mine['idx']}"
                             f"{_fingerprint_text(mine)}; it read .bin {theirs.get('bin')}, .idx "
                             f"{theirs.get('idx')}{_fingerprint_text(theirs)})")
    if _split_fractions(saved.get("split")) != _split_fractions(ours["split"]) and not ours["mock_data"]:
        diffs.append(f"--split {ours['split']} but the checkpoint has {saved.get('split')}")
    for flag, key in (("--seed", "seed"), ("--seq-length", "seq_length"), ("--tokenizer-type", "tokenizer_type"),
                      ("--vocab-size", "vocab_size")):
        if key in saved and saved[key] != ours[key]:
            diffs.append(f"{flag} {ours[key]} but the checkpoint has {saved[key]}")
    if saved.get("sft", False) != ours["sft"]:
        diffs.append("--sft, but the checkpoint's run trained without it" if ours["sft"] else
                     "no --sft, but the checkpoint's run instruction-tuned with it")
    theirs_hash, our_hash = saved.get("tokenizer_sha256"), ours["tokenizer_sha256"]
    if theirs_hash != our_hash and (theirs_hash or saved.get("tokenizer_model")):
        def tok(model, digest):
            return f"{model} (sha256 {digest[:12]})" if digest else f"{model or 'none'}"
        diffs.append(f"--tokenizer-model {tok(ours['tokenizer_model'], our_hash)} but the checkpoint was trained "
                     f"with {tok(saved.get('tokenizer_model'), theirs_hash)}")
    return diffs
