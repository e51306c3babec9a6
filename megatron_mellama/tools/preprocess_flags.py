"""The flags `preprocess_data` and `preprocess_sft` share, declared once, and the checks made of them
before any work.

Each tool builds its own parser and groups, and adds these flags where its `--help` lists them; a
tool whose help says more or less than the shared text passes its own.
"""

from __future__ import annotations

import os

from megatron_mellama.data.jsonl_reader import MAX_LINE_BYTES, expand_inputs
from megatron_mellama.data.tokenizer import TOKENIZER_TYPES, TokenizerError, build_tokenizer
from megatron_mellama.tools import tokenizer_backend
from megatron_mellama.tools.cli import UsageError

MAX_LINE_BYTES_HELP = (f"a JSONL line longer than this is skipped and listed as a rejected record, never "
                       f"read into memory (default {MAX_LINE_BYTES} = {MAX_LINE_BYTES >> 20} MiB; tokenizing "
                       "a line takes about 50 times its size in memory)")
MAX_REJECT_FRACTION_HELP = ("fail (exit 1, no output written, existing outputs untouched) when more than this "
                            "share of the records is rejected, or all of them are (default 0.1); 1 allows any "
                            "share short of all")


def add_input(group) -> None:
    group.add_argument("--input", required=True,
                       help="JSONL file (.jsonl or .jsonl.gz) or a quoted glob; files in sorted order")


def add_max_line_bytes(group, help_text: str = MAX_LINE_BYTES_HELP) -> None:
    group.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES, metavar="N", help=help_text)


def add_tokenizer(group, *, model_required: bool) -> None:
    """--tokenizer-type, --tokenizer-model, --tokenizer-backend and --tokenizer-check-fraction. Where the
    model is not required by the parser, `check_common_args` requires it, naming the tokenizer type."""
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", required=model_required,
                       help="SentencePiece .model file, or a Hugging Face tokenizer directory")
    tokenizer_backend.add_flags(group)


def add_output(group) -> None:
    group.add_argument("--output-prefix", required=True, help="path prefix of the output files")


def add_runtime(group, *, counted: str, max_reject_fraction_help: str = MAX_REJECT_FRACTION_HELP) -> None:
    """--log-interval (in `counted`: what the progress lines count), --strict, --max-reject-fraction."""
    group.add_argument("--log-interval", type=int, default=10000, help=f"{counted} between progress lines")
    group.add_argument("--strict", action="store_true", help="stop at the first unusable record (exit 1)")
    group.add_argument("--max-reject-fraction", type=float, default=0.1, metavar="F",
                       help=max_reject_fraction_help)


def check_common_args(args):
    """The checks both tools make of their shared flags before any work (inputs, bad-record limits,
    output directory, tokenizer and its backend); sets `args.inputs`, `args.tokenizer` and what
    `tokenizer_backend.choose` sets."""
    args.inputs = expand_inputs(args.input)
    if not args.inputs:
        raise UsageError(f"--input {args.input!r}: no such file, and no file matches it as a glob")
    for path in args.inputs:
        if not os.access(path, os.R_OK):
            raise UsageError(f"--input {path!r} is not readable")
    if not 0 <= args.max_reject_fraction <= 1:
        raise UsageError(f"--max-reject-fraction {args.max_reject_fraction} must be between 0 and 1")
    if args.max_line_bytes < 1:
        raise UsageError(f"--max-line-bytes {args.max_line_bytes} must be at least 1")
    if args.log_interval < 1:
        raise UsageError(f"--log-interval {args.log_interval} must be at least 1")
    if not args.tokenizer_model:
        raise UsageError(f"--tokenizer-model is required for --tokenizer-type {args.tokenizer_type}")
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--output-prefix {args.output_prefix!r}: directory {out_dir!r} does not exist")
    if not os.access(out_dir, os.W_OK):
        raise UsageError(f"--output-prefix {args.output_prefix!r}: directory {out_dir!r} is not writable")
    try:
        args.tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    except TokenizerError as err:
        raise UsageError(f"--tokenizer-model: {err}") from None
    tokenizer_backend.choose(args)
    return args
