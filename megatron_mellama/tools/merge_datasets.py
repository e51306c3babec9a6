"""Concatenate Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`) into one.

    mellama-merge-datasets --input data/shards --output-prefix data/bio_text_document
    mellama-merge-datasets --prefixes data/a data/b --output-prefix data/ab

`--input` merges every prefix in a folder in sorted order, as Megatron-LM's
`tools/merge_datasets.py` does; `--prefixes` fixes the order explicitly. The merge itself is
megatron-core's `IndexedDatasetBuilder.add_index`, so the output is byte-identical to Megatron-LM's.
Every input is checked before anything is written, the output is written under temporary names and
renamed into place last: a failed merge leaves no partial output and an existing one untouched.
"""

import argparse
import os
import sys
import warnings

from megatron_mellama.data.index_file import DatasetError, read_index
from megatron_mellama.tools.cli import OneLineParser, run_tool

PROG = "mellama-merge-datasets"


def prefixes_in(folder: str) -> list[str]:
    """Every `X` with `X.bin` or `X.idx` in `folder`, sorted; a half pair is an error."""
    if not os.path.isdir(folder):
        raise DatasetError(f"--input {folder!r} is not a directory")
    pairs: dict[str, set] = {}
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if ext in (".bin", ".idx") and os.path.isfile(os.path.join(folder, name)):
            pairs.setdefault(stem, set()).add(ext)
    for stem, exts in sorted(pairs.items()):
        if len(exts) == 1:
            have, lack = (".bin", ".idx") if ".bin" in exts else (".idx", ".bin")
            raise DatasetError(f"{os.path.join(folder, stem)}: has {stem}{have} but no {stem}{lack}")
    if not pairs:
        raise DatasetError(f"--input {folder!r} holds no .bin/.idx pairs")
    return [os.path.join(folder, stem) for stem in sorted(pairs)]


def merge(prefixes: list[str], output_prefix: str, multimodal: bool = False, log=print) -> None:
    indices = [read_index(p) for p in prefixes]
    dtype = indices[0].dtype
    for index in indices[1:]:
        if index.dtype != dtype:
            raise DatasetError(f"{index.prefix} holds {index.dtype.__name__} tokens but {prefixes[0]} "
                               f"holds {dtype.__name__}; all inputs must share one dtype")
    out_dir = os.path.dirname(output_prefix) or "."
    if not os.path.isdir(out_dir):
        raise DatasetError(f"--output-prefix {output_prefix!r}: directory {out_dir!r} does not exist")
    out = os.path.realpath(output_prefix)
    for p in prefixes:
        if os.path.realpath(p) == out:
            raise DatasetError(f"--output-prefix {output_prefix!r} is also an input")

    # Imported here: megatron-core takes seconds to import, and --help or a bad flag should not wait.
    # Its package import warns about missing Transformer Engine optimizers, which a merge never uses.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tmp = f"{output_prefix}.merging-{os.getpid()}"
    tmp_bin, tmp_idx = tmp + ".bin", tmp + ".idx"
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype, multimodal=multimodal)
        for i, index in enumerate(indices, 1):
            builder.add_index(index.prefix)
            log(f"[{i}/{len(indices)}] merged {index.prefix}: {index.document_count:,} documents, "
                f"{len(index.sequence_lengths):,} sequences")
        builder.finalize(tmp_idx)
        # .bin first: a reader finding the new .idx must find its data.
        os.replace(tmp_bin, output_prefix + ".bin")
        os.replace(tmp_idx, output_prefix + ".idx")
    finally:
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Concatenate Megatron indexed datasets (PREFIX.bin + PREFIX.idx) "
                "into one, byte-identical to Megatron-LM's tools/merge_datasets.py.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="DIR", help="merge every prefix in this folder, in sorted order")
    src.add_argument("--prefixes", nargs="+", metavar="PREFIX", help="merge these prefixes, in this order")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="output path without .bin/.idx (its folder must exist)")
    p.add_argument("--multimodal", action="store_true",
                   help="the inputs carry per-sequence modes (as Megatron-LM's flag)")
    return p


def main(argv=None) -> int:
    return run_tool(PROG, lambda: build_parser().parse_args(argv), _run, errors=(DatasetError, OSError))


def _run(args) -> int:
    prefixes = prefixes_in(args.input) if args.input else args.prefixes
    merge(prefixes, args.output_prefix, args.multimodal)
    print(f"wrote {args.output_prefix}.bin and {args.output_prefix}.idx from {len(prefixes)} datasets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
