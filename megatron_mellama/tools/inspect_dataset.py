"""Summarise a Megatron indexed dataset (`PREFIX.bin` + `PREFIX.idx`), or print one document.

    mellama-inspect-dataset data/bio_text_document
    mellama-inspect-dataset data/bio_text_document --document 7 \\
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model
    mellama-inspect-dataset data/bio_text_document --json

The index is parsed with numpy (`data/index_file.py`) rather than through megatron-core's reader:
that reader asserts on a bad file, and importing megatron-core costs seconds a quick look should
not pay.
The .bin is memory-mapped and read in chunks, so datasets larger than memory can be inspected.
"""

import argparse
import json
import os
import sys

import numpy as np

from megatron_mellama.data.index_file import DatasetError, Index, read_index
from megatron_mellama.data.tokenizer import TOKENIZER_TYPES
from megatron_mellama.tools.cli import OneLineParser, run_tool

PROG = "mellama-inspect-dataset"
CHUNK = 1 << 24  # elements per streamed chunk: 64 MiB of int32


def _chunks(array: np.ndarray):
    for start in range(0, len(array), CHUNK):
        yield array[start:start + CHUNK]


def length_buckets(max_len: int) -> list[int]:
    """Lower bucket edges 0, 1, 2, 5, 10, 20, 50, ... up to the first edge above `max_len`."""
    edges, step = [0, 1], 0
    while edges[-1] <= max_len:
        edges.append((1, 2, 5)[(step + 1) % 3] * 10 ** ((step + 1) // 3))
        step += 1
    return edges


def summarise(index: Index, top_k: int = 20) -> dict:
    """Counts, length histogram and most frequent tokens, streaming over both files."""
    lengths = index.sequence_lengths
    n_seq = len(lengths)
    total, lo, hi = 0, None, None
    for chunk in _chunks(lengths):
        total += int(chunk.sum(dtype=np.int64))
        lo = int(chunk.min()) if lo is None else min(lo, int(chunk.min()))
        hi = int(chunk.max()) if hi is None else max(hi, int(chunk.max()))
    edges = length_buckets(hi or 0)
    hist = np.zeros(len(edges) - 1, dtype=np.int64)
    for chunk in _chunks(lengths):
        hist += np.bincount(np.searchsorted(edges, chunk, side="right") - 1, minlength=len(hist))

    bin_path = index.prefix + ".bin"
    itemsize = np.dtype(index.dtype).itemsize
    bin_bytes = os.path.getsize(bin_path)
    if bin_bytes != total * itemsize:
        raise DatasetError(f"{bin_path} holds {bin_bytes} bytes but {index.prefix}.idx describes "
                           f"{total} tokens of {np.dtype(index.dtype).name} ({total * itemsize} bytes)")
    return {
        "prefix": index.prefix,
        "dtype": np.dtype(index.dtype).name,
        "sequences": n_seq,
        "documents": index.document_count,
        "tokens": total,
        "bin_bytes": bin_bytes,
        "idx_bytes": os.path.getsize(index.prefix + ".idx"),
        "mean_sequence_length": total / n_seq if n_seq else None,
        "min_sequence_length": lo,
        "max_sequence_length": hi,
        "length_histogram": [{"min": int(a), "max": int(b) - 1, "count": int(c)}
                             for a, b, c in zip(edges, edges[1:], hist)],
        "top_tokens": _top_tokens(bin_path, index.dtype, total, top_k),
    }


def _top_tokens(bin_path: str, dtype, n_tokens: int, k: int) -> list[list[int]]:
    if n_tokens == 0 or k <= 0:
        return []
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))
    counts = np.zeros(0, dtype=np.int64)
    other: dict = {}  # ids bincount cannot take: negative or non-integer values
    for chunk in _chunks(tokens):
        if np.issubdtype(chunk.dtype, np.integer) and chunk.min() >= 0:
            c = np.bincount(chunk)
            if len(c) > len(counts):
                counts = np.pad(counts, (0, len(c) - len(counts)))
            counts[:len(c)] += c
        else:
            for v, c in zip(*np.unique(chunk, return_counts=True)):
                other[v.item()] = other.get(v.item(), 0) + int(c)
    top = np.argsort(-counts, kind="stable")[:k]
    pairs = [(int(i), int(counts[i])) for i in top if counts[i]] + list(other.items())
    return [[t, c] for t, c in sorted(pairs, key=lambda p: -p[1])[:k]]


def document_tokens(index: Index, n: int) -> np.ndarray:
    count = index.document_count
    if not 0 <= n < count:
        valid = f"valid: 0..{count - 1}" if count else "the dataset has no documents"
        raise DatasetError(f"--document {n} is out of range ({valid})")
    first, end = int(index.document_indices[n]), int(index.document_indices[n + 1])
    n_tokens = int(index.sequence_lengths[first:end].sum(dtype=np.int64))
    offset = int(index.sequence_pointers[first]) if end > first else 0
    return np.memmap(index.prefix + ".bin", dtype=index.dtype, mode="r", offset=offset,
                     shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype=index.dtype)


def _decode(tokenizer, ids) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
    if bad:
        raise DatasetError(f"token id {bad[0]} is outside the tokenizer's vocabulary "
                           f"(size {tokenizer.vocab_size}); is it the tokenizer the data was made with?")
    return tokenizer.detokenize(ids)


def _print_summary(s: dict, tokenizer) -> None:
    def stat(v):
        return "-" if v is None else f"{v:,.1f}" if isinstance(v, float) else f"{v:,}"

    print(f"dataset   {s['prefix']}  ({s['dtype']})")
    print(f"files     .bin {s['bin_bytes']:,} bytes, .idx {s['idx_bytes']:,} bytes")
    print(f"counts    {s['documents']:,} documents, {s['sequences']:,} sequences, {s['tokens']:,} tokens")
    print(f"sequence  length mean {stat(s['mean_sequence_length'])}, min {stat(s['min_sequence_length'])}, "
          f"max {stat(s['max_sequence_length'])}")
    rows = s["length_histogram"]
    while len(rows) > 1 and rows[0]["count"] == 0:  # an empty-sequence row would nearly always read 0
        rows = rows[1:]
    if s["sequences"]:
        print("\nsequence length histogram")
        peak = max(r["count"] for r in rows) or 1
        for r in rows:
            share = 100 * r["count"] / s["sequences"] if s["sequences"] else 0.0
            span = f"{r['min']:>10,}" + (f" - {r['max']:<10,}" if r["max"] > r["min"] else " " * 13)
            print(f"  {span} {'#' * round(40 * r['count'] / peak):<40} {r['count']:>12,} {share:5.1f}%")
    if s["top_tokens"]:
        print("\nmost frequent tokens")
        for token, count in s["top_tokens"]:
            text = f"  {_decode(tokenizer, [token])!r}" if tokenizer else ""
            print(f"  {token:>10} {count:>14,} {100 * count / s['tokens']:5.1f}%{text}")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Summarise a Megatron indexed dataset (PREFIX.bin + PREFIX.idx): "
                "counts, sequence-length histogram, most frequent tokens; or print one document.")
    p.add_argument("prefix", help="dataset path prefix, without .bin/.idx")
    p.add_argument("--document", type=int, metavar="N", help="print the tokens of document N (from 0)")
    p.add_argument("--top-k", type=int, default=20, metavar="K", help="most frequent tokens to list (default 20)")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES,
                   help="decode tokens with this tokenizer (needs --tokenizer-model)")
    p.add_argument("--tokenizer-model", metavar="PATH",
                   help="SentencePiece .model file, or Hugging Face tokenizer directory")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv=None) -> int:
    return run_tool(PROG, lambda: build_parser().parse_args(argv), _run, errors=(DatasetError,))


def _run(args) -> int:
    if (args.tokenizer_type is None) != (args.tokenizer_model is None):
        raise DatasetError("--tokenizer-type and --tokenizer-model go together; give both or neither")
    index = read_index(args.prefix)
    tokenizer = None
    if args.tokenizer_type:
        from megatron_mellama.data.tokenizer import TokenizerError, build_tokenizer
        try:
            tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        except TokenizerError as e:
            raise DatasetError(str(e)) from None

    if args.document is not None:
        tokens = document_tokens(index, args.document)
        out = {"document": args.document, "tokens": tokens.tolist()}
        if tokenizer:
            out["text"] = _decode(tokenizer, tokens)
        if args.json:
            print(json.dumps(out))
        else:
            print(f"document {args.document} of {index.document_count}: {len(tokens)} tokens")
            print(out["tokens"])
            if tokenizer:
                print(out["text"])
        return 0

    summary = summarise(index, args.top_k)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary, tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
