"""Score multiple-choice tasks by log-likelihood, as lm-evaluation-harness does, in one process.

    evaluate.py --tasks mmlu=data/mmlu.jsonl medqa=data/medqa.jsonl --hf-dir Me-LLaMA-13b [--output results.json]
    evaluate.py --tasks medqa=data/medqa.jsonl --load ckpt/me-llama-13b \\
                --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model

Each task is a JSONL file (`megatron_mellama.evaluation.tasks` describes the format); every file
is checked before the model loads. The model is a Hugging Face LLaMA folder (with its tokenizer)
or one of our checkpoints, whatever layout saved it. acc: the choice of highest summed
log-likelihood; acc_norm: highest log-likelihood per character of the choice. --output holds
each task's figures and every item's per-choice log-likelihoods. A model that gives an inf/NaN
log-likelihood (broken weights) is an error naming the task and item, not a chance-level score.
"""

from __future__ import annotations

import json
import os
import sys
import time

from .cli import OneLineParser, UsageError, run_tool


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", required=True, metavar="NAME=PATH", help="task files, e.g. mmlu=mmlu.jsonl")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--hf-dir", help="Hugging Face LLaMA folder (weights, config.json and tokenizer)")
    model.add_argument("--load", help="our checkpoint: its root (latest iteration) or an iter_* directory")
    p.add_argument("--tokenizer-type", choices=("Llama2Tokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer"),
                   help="tokenizer for --load")
    p.add_argument("--tokenizer-model", help="for --load: the SentencePiece .model, or a Hugging Face tokenizer "
                   "folder; it must be the tokenizer the checkpoint was trained with (its sha256 is recorded there)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true", help="with --load: score with "
                   "--tokenizer-model even though it is not the tokenizer the checkpoint records")
    p.add_argument("--no-bos", action="store_true", help="encode without the BOS token (lm-eval's "
                   "add_bos_token=False); by default the tokenizer's own default, BOS first for LLaMA")
    p.add_argument("--batch-size", type=int, default=8, help="rows (item x choice) per forward (default 8)")
    p.add_argument("--seq-length", type=int, help="longest row; longer prompts lose their start (default: the "
                   "model's max_position_embeddings)")
    p.add_argument("--limit", type=int, help="score only the first N items of each task")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="weights' dtype; log-softmax is fp32 either way (default fp32)")
    p.add_argument("--output", help="write the results as JSON here (atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    from ..checkpoint.layout import CheckpointError
    from ..checkpoint.sources import ConvertError
    from ..data.tokenizer import TokenizerError
    from ..evaluation.load_model import ModelLoadError
    from ..evaluation.tasks import TaskError

    return run_tool("evaluate", lambda: _parse(argv), _run,
                    errors=(TaskError, ModelLoadError, TokenizerError, ConvertError, CheckpointError))


def _parse(argv):
    args = build_parser().parse_args(argv)
    for flag in ("batch_size", "limit", "seq_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {value}: expected a positive integer")
    if args.load and not (args.tokenizer_type and args.tokenizer_model):
        raise UsageError("--load needs --tokenizer-type and --tokenizer-model")
    if args.hf_dir and args.allow_tokenizer_mismatch:
        raise UsageError("--allow-tokenizer-mismatch goes with --load; --hf-dir uses the folder's tokenizer")
    if args.hf_dir and (args.tokenizer_type or args.tokenizer_model):
        raise UsageError("--tokenizer-type/--tokenizer-model go with --load; --hf-dir uses the folder's tokenizer")
    if args.output and os.path.isdir(args.output):
        raise UsageError(f"--output {args.output}: is a directory (expected a file name)")
    return args


def _run(args) -> int:
    # imported here, not at the top, so that --help and flag errors answer without loading torch
    import torch
    from tqdm import tqdm

    from ..evaluation.requests import RequestError
    from ..evaluation.scoring import NonFiniteLoglikelihood, score_task
    from ..evaluation.tasks import load_tasks, parse_task_specs

    # every task file is read and checked before any model is loaded
    tasks = load_tasks(parse_task_specs(args.tasks))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loglikelihood_fn, encode, max_length = _model(args, device)
    if args.seq_length and args.seq_length > max_length:
        raise UsageError(f"--seq-length {args.seq_length}: longer than the model's {max_length} positions")
    seq_length = args.seq_length or max_length

    results = {}
    for task in tasks:
        items = task.items[:args.limit] if args.limit else task.items
        start = time.perf_counter()
        with tqdm(total=sum(len(i.choices) for i in items), desc=task.name, unit="row", disable=args.no_progress,
                  dynamic_ncols=True, file=sys.stderr) as bar:
            try:
                score = score_task(items, encode, seq_length, loglikelihood_fn, args.batch_size, bar.update)
            except RequestError as exc:
                raise UsageError(f"{task.path}:{items[exc.item].line}: {exc}") from None
            except NonFiniteLoglikelihood as exc:
                raise UsageError(exc.where(task.name, task.path, items[exc.item].line)) from None
        results[task.name] = dict(path=task.path, items=len(items), acc=score.acc, acc_norm=score.acc_norm,
                                  seconds=round(time.perf_counter() - start, 3),
                                  predictions=[vars(s) for s in score.items])
    _print_table(results)
    if args.output:
        _write_json_atomically(args.output, dict(model=args.hf_dir or args.load, seq_length=seq_length,
                                                 bos="none" if args.no_bos else "tokenizer default",
                                                 tasks=results))
    return 0


def _model(args, device):
    """(loglikelihood_fn, encode, the model's maximum sequence length) for --hf-dir or --load."""
    from ..checkpoint.convert import find_checkpoint
    from ..checkpoint.trained_tokenizer import check_tokenizer
    from ..evaluation.load_model import load_hf_model, load_our_checkpoint
    from ..evaluation.loglikelihood import hf_loglikelihood_fn, llama_loglikelihood_fn
    from ..evaluation.requests import hf_encoder, tokenizer_encoder

    add_bos = False if args.no_bos else None
    if args.hf_dir:
        model, tokenizer, max_length = load_hf_model(args.hf_dir, device, args.dtype, progress=not args.no_progress)
        return hf_loglikelihood_fn(model), hf_encoder(tokenizer, add_bos), max_length
    if not args.allow_tokenizer_mismatch:
        check_tokenizer(find_checkpoint(args.load), args.tokenizer_model)
    encode = tokenizer_encoder(args.tokenizer_type, args.tokenizer_model, add_bos)
    model, max_length = load_our_checkpoint(args.load, device, args.dtype)
    return llama_loglikelihood_fn(model), encode, max_length


def _print_table(results: dict) -> None:
    width = max([4] + [len(name) for name in results])
    print(f"{'task':<{width}}  {'items':>6}  {'acc':>7}  {'acc_norm':>8}  {'seconds':>8}")
    for name, r in results.items():
        print(f"{name:<{width}}  {r['items']:>6}  {r['acc']:>7.4f}  {r['acc_norm']:>8.4f}  {r['seconds']:>8.1f}")


def _write_json_atomically(path: str, obj: dict) -> None:
    # a reader never sees a half-written file: the whole file is written beside it, then renamed
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        # strict JSON: a bare NaN or Infinity is no JSON value, and other readers reject the file
        text = json.dumps(obj, indent=1, allow_nan=False)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    except ValueError as exc:
        raise UsageError(f"--output {path}: a result is not a finite number ({exc}); nothing written") from None
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UsageError(f"--output {path}: cannot write ({exc.strerror or exc})") from None


if __name__ == "__main__":
    sys.exit(main())
