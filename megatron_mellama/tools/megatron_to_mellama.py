"""Import a Megatron-LM checkpoint (torch_dist or torch format, any TP/PP) as iteration 0 of a megatron_mellama checkpoint.

    megatron_to_mellama.py --load MEGATRON_ROOT --save ckpt/13b [--iteration N] [--tokenizer-model tokenizer.model]
                           [--dtype keep|bf16|fp16|fp32] [--overwrite]

MEGATRON_ROOT is what Megatron-LM's --save wrote: latest_checkpointed_iteration.txt and iter_NNNNNNN/
(or release/); an iteration folder itself is accepted too. torch_dist (megatron-core's
dist_checkpointing, the default since 2024) and the torch format (mp_rank_*/model_optim_rng.pt, with
megatron-core names of the local or Transformer Engine spec, virtual pipeline stages, or the legacy
language_model names) are read. The architecture comes from the checkpoint's saved args; a model this
LLaMA2 cannot represent (LayerNorm, biases, tied embeddings, learned positions, experts, another
activation) is refused by name before anything is written. The pickles are read without running
code (an allow-list of the types Megatron-LM stores).

--tokenizer-model drops the rows Megatron-LM padded the vocabulary with (to a multiple of
--make-vocab-size-divisible-by x TP); without it the checkpoint's args.tokenizer_model is used when
that file exists here, else every padded row is kept.

Weights only: the optimizer state is not imported. Continue with
`pretrain --load ckpt/13b --finetune ...` (a fresh optimizer), under any parallel layout.
"""

from __future__ import annotations

import sys
import time

from .cli import OneLineParser, run_tool


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="megatron_to_mellama", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="Megatron-LM checkpoint root (its latest_checkpointed_iteration.txt "
                   "decides), or one iter_* / release folder")
    p.add_argument("--save", required=True, help="checkpoint root to write (iter_0000000/ and latest); must be "
                   "empty or absent unless --overwrite")
    p.add_argument("--iteration", type=int, help="import iter_NNNNNNN instead of the latest")
    p.add_argument("--tokenizer-model", help="the SentencePiece model the checkpoint was trained with: the "
                   "vocabulary rows beyond it (Megatron-LM's padding) are dropped")
    p.add_argument("--dtype", default="keep", choices=("keep", "bf16", "fp16", "fp32"),
                   help="dtype of the stored tensors (default: keep, the checkpoint's); fp16 refuses a tensor with "
                   "values beyond its range rather than store inf")
    p.add_argument("--overwrite", action="store_true", help="replace a --save folder that is not empty, whole, once "
                   "the new one is complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    from ..checkpoint.layout import CheckpointError
    from ..checkpoint.sources import ConvertError

    return run_tool("megatron_to_mellama", lambda: build_parser().parse_args(argv), _run,
                    errors=(ConvertError, CheckpointError))


def _run(args) -> int:
    from ..checkpoint.megatron.importer import import_megatron
    from ..checkpoint.trained_tokenizer import check_tokenizer_file

    if args.tokenizer_model:
        check_tokenizer_file(args.tokenizer_model)
    start = time.time()
    path = import_megatron(args.load, args.save, iteration=args.iteration, tokenizer_model=args.tokenizer_model,
                           dtype=args.dtype, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"wrote {path} in {time.time() - start:.1f}s (weights only: continue with pretrain --load {args.save} "
          "--finetune)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
