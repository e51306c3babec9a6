"""Export a megatron_mellama checkpoint (any parallel layout) as a Megatron-LM checkpoint root.

    mellama_to_megatron.py --load ckpt/13b --save megatron/13b --tensor-model-parallel-size T
                           [--pipeline-model-parallel-size P] [--format torch_dist|torch]
                           [--make-vocab-size-divisible-by 128] [--transformer-impl transformer_engine|local]
                           [--dtype keep|bf16|fp16|fp32] [--overwrite]

--save gets what Megatron-LM's --save writes: latest_checkpointed_iteration.txt ("0") and
iter_0000000/, with the saved args carrying the architecture (Megatron-LM's --use-checkpoint-args
reads them). Load it with `--load DIR --finetune` (weights only: no optimizer or RNG state is
written; the optimizer starts afresh).

--format torch_dist (default; megatron-core's dist_checkpointing) is layout-free: Megatron-LM loads
it at any TP/PP, with the local or the Transformer Engine layer spec; T and P are recorded in the
args, and T sets the padded vocabulary (the embedding and output layer are padded with zero rows to
a multiple of --make-vocab-size-divisible-by x T, as Megatron-LM pads). --format torch writes one
file per model-parallel rank for exactly T x P ranks, with --transformer-impl's state-dict names;
it needs the layers to split evenly over the P stages, and has no virtual pipeline stages.

The export owns --save: a folder that holds anything is refused unless --overwrite, which replaces
it whole. It is written as a hidden sibling folder and renamed in at the end, so an error leaves
--save as it was. Memory holds one layer's tensor (torch_dist) or one rank file (torch) at a time.
"""

from __future__ import annotations

import sys
import time

from .cli import OneLineParser, run_tool


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="mellama_to_megatron", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint root (its latest iteration) or an iter_* directory")
    p.add_argument("--save", required=True, help="Megatron-LM checkpoint root to write; must be empty or absent "
                   "unless --overwrite")
    p.add_argument("--tensor-model-parallel-size", type=int, required=True, metavar="T",
                   help="Megatron-LM's TP size: the torch format's ranks; for torch_dist, the recorded size and "
                   "the vocabulary's padding (Megatron-LM reshards torch_dist at load)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, metavar="P",
                   help="pipeline stages (default 1); no virtual pipeline stages")
    p.add_argument("--format", default="torch_dist", choices=("torch_dist", "torch"),
                   help="Megatron-LM's --ckpt-format (default torch_dist)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128, metavar="N",
                   help="Megatron-LM's vocabulary padding: a multiple of N x T rows (default 128)")
    p.add_argument("--transformer-impl", default="transformer_engine", choices=("transformer_engine", "local"),
                   help="the layer spec the Megatron-LM run uses (default transformer_engine): the torch "
                   "format's tensor names; recorded in the args")
    p.add_argument("--dtype", default="keep", choices=("keep", "bf16", "fp16", "fp32"),
                   help="dtype of the written tensors; keep: the checkpoint's. fp16 refuses a tensor with "
                   "values beyond its range (|x| > 65504) rather than write inf")
    p.add_argument("--overwrite", action="store_true", help="replace a --save folder that is not empty, whole, "
                   "once the new one is complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    from ..checkpoint.layout import CheckpointError
    from ..checkpoint.sources import ConvertError

    return run_tool("mellama_to_megatron", lambda: build_parser().parse_args(argv), _run,
                    errors=(ConvertError, CheckpointError))


def _run(args) -> int:
    from ..checkpoint.megatron.export import export_megatron

    start = time.time()
    files = export_megatron(args.load, args.save, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                            args.format, args.make_vocab_size_divisible_by, args.transformer_impl, args.dtype,
                            progress=not args.no_progress, overwrite=args.overwrite)
    print(f"wrote {len(files)} files ({args.format}, TP {args.tensor_model_parallel_size}, PP "
          f"{args.pipeline_model_parallel_size}) to {args.save} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
