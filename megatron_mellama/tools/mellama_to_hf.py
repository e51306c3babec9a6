"""Export a megatron_mellama checkpoint (any parallel layout) as a Hugging Face LLaMA folder.

    mellama_to_hf.py --load ckpt/13b --hf-dir out/13b-hf [--max-shard-size 5GB] [--dtype keep|bf16|fp16|fp32]
                     [--tokenizer-model tokenizer.model] [--chat-template saved|none|llama-2|FILE] [--overwrite]

The export owns --hf-dir: a folder that holds anything (an older model, say, whose weights
`from_pretrained` would otherwise load beside the new config) is refused unless --overwrite, which
replaces it whole. It is written as a hidden sibling folder and renamed in at the end, so an error
leaves --hf-dir as it was. --dtype fp16 refuses a tensor with values beyond fp16's range.

The chat template of an instruction-tuned checkpoint (the one `pretrain --sft` read beside its data)
is written into tokenizer_config.json with the tokenizer, so transformers' `apply_chat_template` then
`generate` prompt the model as it was trained; --chat-template replaces or drops it.

--tokenizer-model must be the tokenizer the checkpoint was trained with (its sha256 is recorded in
the checkpoint): another one is refused, naming both, unless --allow-tokenizer-mismatch.
"""

from __future__ import annotations

import re
import sys
import time

from .cli import OneLineParser, UsageError, run_tool

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.I)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"--max-shard-size {text}: expected a size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="mellama_to_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint root (its latest iteration) or an iter_* directory")
    p.add_argument("--hf-dir", required=True, help="folder to write the Hugging Face model to; must be empty or absent "
                   "unless --overwrite")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument("--dtype", default="keep", choices=("keep", "bf16", "fp16", "fp32"),
                   help="dtype of the written tensors; keep: the checkpoint's. fp16 refuses a tensor with "
                   "values beyond its range (|x| > 65504) rather than write inf")
    p.add_argument("--tokenizer-model", help="LLaMA2 SentencePiece tokenizer.model to ship with the model; it must be "
                   "the one the checkpoint was trained with (its sha256 is recorded there)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true", help="ship --tokenizer-model even though it "
                   "is not the tokenizer the checkpoint records (another file of the same vocabulary)")
    p.add_argument("--chat-template", default="saved", metavar="saved|none|llama-2|FILE",
                   help="chat template for tokenizer_config.json: saved (default): the one the checkpoint's "
                   "instruction tuning recorded, if any; none; llama-2: LLaMA-2-chat's; FILE: a Jinja file")
    p.add_argument("--overwrite", action="store_true", help="replace a --hf-dir folder that is not empty, whole "
                   "(every file in it), once the new one is complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    from ..checkpoint.layout import CheckpointError
    from ..checkpoint.sources import ConvertError

    return run_tool("mellama_to_hf", lambda: build_parser().parse_args(argv), _run,
                    errors=(ConvertError, CheckpointError))


def _run(args) -> int:
    limit = parse_size(args.max_shard_size)

    from ..checkpoint.convert import export_checkpoint, find_checkpoint, saved_chat_template
    from ..checkpoint.trained_tokenizer import check_tokenizer, check_tokenizer_file

    if args.tokenizer_model:
        check_tokenizer_file(args.tokenizer_model)
        if not args.allow_tokenizer_mismatch:
            check_tokenizer(find_checkpoint(args.load), args.tokenizer_model)
    if args.chat_template == "saved":
        template = saved_chat_template(find_checkpoint(args.load))
        if template is not None and not args.tokenizer_model:
            print("the checkpoint's chat template is not exported: it goes with the tokenizer (--tokenizer-model)")
            template = None
    else:
        template = chat_template(args.chat_template)
    start = time.time()
    files = export_checkpoint(args.load, args.hf_dir, limit, args.dtype, args.tokenizer_model,
                              progress=not args.no_progress, overwrite=args.overwrite, chat_template=template)
    print(f"wrote {len(files)} files to {args.hf_dir} in {time.time() - start:.1f}s"
          + (", the chat template in tokenizer_config.json" if template is not None else ""))
    return 0


def chat_template(choice: str) -> str | None:
    """--chat-template other than `saved`: Jinja source or None."""
    from ..data.chat_template import LLAMA2_CHAT_TEMPLATE

    named = {"none": None, "llama-2": LLAMA2_CHAT_TEMPLATE}
    if choice in named:
        return named[choice]
    try:
        with open(choice, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--chat-template {choice}: expected saved, none, llama-2 or a readable Jinja file "
                         f"({err.strerror if isinstance(err, OSError) else 'not UTF-8'})") from None
    if not source.strip():
        raise UsageError(f"--chat-template {choice}: the file is empty")
    return source


if __name__ == "__main__":
    sys.exit(main())
