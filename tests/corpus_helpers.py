"""Small generated JSONL corpora and helpers to run the preprocessing tool on them in tests."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np

WORDS = ("the a of and to in is was with for on by patient patients clinical doctor nurse hospital disease "
         "treatment therapy dose trial study result method data blood heart cancer risk care health test "
         "year after before during analysis outcome review evidence significant Dr. Mr. vs. e.g. approx.").split()


def make_documents(n: int, seed: int = 0) -> list[str]:
    """English-like documents of 1-6 sentences, some with abbreviations, newlines and non-ASCII text."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
            if rng.random() < 0.2:
                words.insert(rng.randrange(len(words)), rng.choice(["café", "naïve", "β-blocker", "37.5°C"]))
            sentences.append(" ".join(words).capitalize() + rng.choice(".!?"))
        docs.append(rng.choice([" ", " ", "\n"]).join(sentences))
    return docs


def write_jsonl(path, records, gz: bool = False) -> Path:
    """`records`: dicts (written as JSON) or raw bytes lines (written as they are)."""
    lines = [r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode() for r in records]
    data = b"".join(line + b"\n" for line in lines)
    path = Path(path)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def read_documents(prefix: str) -> list[np.ndarray]:
    """Token arrays per document, read with megatron-core's own reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    bounds = ds.document_indices
    return [np.concatenate([ds[i] for i in range(bounds[d], bounds[d + 1])] or [np.zeros(0, ds.index.dtype)])
            for d in range(len(bounds) - 1)]


def reference_files(tmp_path, name: str, documents, dtype) -> tuple[bytes, bytes]:
    """.bin and .idx bytes megatron-core's IndexedDatasetBuilder writes for documents of sequences."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = Path(tmp_path) / name
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for sequences in documents:
        flat = [t for s in sequences for t in s]
        builder.add_document(np.array(flat, dtype=np.int64), [len(s) for s in sequences])
    builder.finalize(f"{prefix}.idx")
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def output_bytes(prefix: str) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()
