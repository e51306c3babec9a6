"""Import a Hugging Face (or Meta original) LLaMA2 checkpoint as iteration 0 of a megatron_mellama checkpoint.

    hf_to_mellama.py --hf-dir Llama-2-13b-hf --save ckpt/13b [--dtype keep|bf16|fp16|fp32] [--source-format hf|meta]
                     [--overwrite]

The tensors keep the source's dtype unless --dtype says otherwise (bf16 for Meta's and Hugging Face's
LLaMA2 releases); training upcasts them into its fp32 master weights as it loads them.
Then `pretrain --load ckpt/13b --finetune <model flags>` starts from it under any parallel layout.

The import owns --save: a folder that holds anything (checkpoints of a run, say) is refused unless
--overwrite, which replaces it whole. It is written as a hidden sibling folder and renamed in at the
end, so an error leaves --save as it was. Every config.json field is either read, checked to be the
one value this LLaMA2 model computes (no RoPE scaling, sliding window, biases, tied embeddings,
activation other than SiLU, ...), or known not to change the function; anything else is refused.
"""

from __future__ import annotations

import os
import sys
import time

from .cli import OneLineParser, UsageError, run_tool


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="hf_to_mellama", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, help="Hugging Face folder (config.json + weights), or Meta's "
                   "folder (params.json + consolidated.*.pth) with --source-format meta")
    p.add_argument("--save", required=True, help="checkpoint root to write (iter_0000000/ and latest); must be "
                   "empty or absent unless --overwrite")
    p.add_argument("--dtype", default="keep", choices=("keep", "bf16", "fp16", "fp32"),
                   help="dtype of the stored tensors (default: keep, each tensor's dtype in the source: a bf16 "
                   "LLaMA2 release stays bf16, half the bytes of fp32 to write and for every rank to read; "
                   "training loads it into its fp32 master weights exactly, with a fresh fp32 optimizer state); fp16 refuses a "
                   "tensor with values beyond its range (|x| > 65504) rather than store inf")
    p.add_argument("--source-format", default="hf", choices=("hf", "meta"))
    p.add_argument("--overwrite", action="store_true", help="replace a --save folder that is not empty, whole "
                   "(everything in it, its checkpoints included), once the new one is complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    from ..checkpoint.sources import ConvertError

    return run_tool("hf_to_mellama", lambda: build_parser().parse_args(argv), _run, errors=(ConvertError,))


def _run(args) -> int:
    if not os.path.isdir(args.hf_dir):
        raise UsageError(f"--hf-dir {args.hf_dir}: no such directory")
    from ..checkpoint.convert import import_checkpoint
    from ..checkpoint.sources import HFSource, MetaSource

    start = time.time()
    source = (MetaSource if args.source_format == "meta" else HFSource)(args.hf_dir)
    path = import_checkpoint(source, args.save, args.dtype, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"wrote {path} ({len(source.names)} tensors) in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
