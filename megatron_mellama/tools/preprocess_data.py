"""JSONL corpora -> megatron-core IndexedDataset files (.bin/.idx), with Megatron-LM's flags.

    mellama-preprocess-data --input 'corpus/*.jsonl.gz' --output-prefix data/bio \\
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --workers 16 --append-eod

writes `data/bio_text_document.{bin,idx}` (`_sentence` with --split-sentences), one pair per
--json-keys key, and `data/bio_rejected.jsonl` listing records that were skipped. Outputs appear
under their final names only when the run succeeds.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import sys
import time

from megatron_mellama.data.indexed_writer import IndexedWriter, optimal_dtype, temp_path
from megatron_mellama.data.jsonl_reader import MAX_LINE_BYTES, expand_inputs, read_blocks, sample_texts
from megatron_mellama.data.record_encoder import RecordEncoder
from megatron_mellama.data.tokenizer import TOKENIZER_TYPES, TokenizerError, build_tokenizer
from megatron_mellama.tools.cli import OneLineParser, UsageError, run_tool

PROG = "mellama-preprocess-data"
BLOCKS_IN_FLIGHT_PER_WORKER = 4  # bounds memory: the reader never runs ahead of the workers by more


class Terminated(Exception):
    """SIGTERM, raised in the main process so the cleanup path runs."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True,
                   help="JSONL file (.jsonl or .jsonl.gz) or a quoted glob; files in sorted order")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract; one output per key")
    g.add_argument("--split-sentences", action="store_true", help="one sequence per sentence (nltk Punkt)")
    g.add_argument("--keep-newlines", action="store_true", help="keep newlines between sentences when splitting")
    g.add_argument("--lang", default="english", help="Punkt language for --split-sentences")
    g.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES, metavar="N",
                   help=f"a JSONL line longer than this is skipped and listed as a rejected record, never "
                        f"read into memory (default {MAX_LINE_BYTES} = {MAX_LINE_BYTES >> 20} MiB; tokenizing "
                        "a line takes about 50 times its size in memory)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="SentencePiece .model file, or a Hugging Face tokenizer directory")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="path prefix of the output files")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    g.add_argument("--log-interval", type=int, default=10000, help="documents between progress lines")
    g.add_argument("--strict", action="store_true", help="stop at the first unusable record (exit 1)")
    return p


def parse_args(argv):
    args = build_parser().parse_args(argv)
    args.inputs = expand_inputs(args.input)
    if not args.inputs:
        raise UsageError(f"--input {args.input!r}: no such file, and no file matches it as a glob")
    for path in args.inputs:
        if not os.access(path, os.R_OK):
            raise UsageError(f"--input {path!r} is not readable")
    if args.workers < 1:
        raise UsageError(f"--workers {args.workers} must be at least 1")
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
    return args


# Worker side: one encoder per process, built once.
_ENCODER = None


def _init_worker(*init_args):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler came along with fork
    _init_encoder(*init_args)


def _init_encoder(tokenizer_type, tokenizer_model, json_keys, append_eod, splitter_spec, dtype, tokenizer=None):
    global _ENCODER
    from megatron_mellama.data.sentence_split import SentenceSplitter, identity_split

    tokenizer = tokenizer or build_tokenizer(tokenizer_type, tokenizer_model)
    split = SentenceSplitter(splitter_spec) if splitter_spec is not None else identity_split
    _ENCODER = RecordEncoder(tokenizer, json_keys, append_eod, split, dtype)


def _encode_block(block):
    return _ENCODER.encode_block(block)


def _encoded_blocks(args, init_args):
    """Encoded blocks in input order; with several workers at most a few blocks per worker in flight.

    Not `Pool.imap`: its feeder thread drains the input as fast as it can read it, so on a corpus
    bigger than memory the queue of unencoded blocks grows without bound.
    """
    blocks = read_blocks(args.inputs, max_line_bytes=args.max_line_bytes)
    if args.workers == 1:  # in-process: no pickling, and the tokenizer is already built
        _init_encoder(*init_args, tokenizer=args.tokenizer)
        yield from map(_encode_block, blocks)
        return
    import multiprocessing

    pool = multiprocessing.Pool(args.workers, initializer=_init_worker, initargs=init_args)
    try:
        pending = collections.deque()
        for block in blocks:
            pending.append(pool.apply_async(_encode_block, (block,)))
            if len(pending) >= BLOCKS_IN_FLIGHT_PER_WORKER * args.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


class _Progress:
    def __init__(self, interval: int):
        self.interval, self.start, self.next = interval, time.time(), interval
        self.documents = self.bytes = self.tokens = 0

    def update(self, result) -> None:
        self.documents += result.documents
        self.bytes += result.bytes
        self.tokens += result.tokens
        if self.documents >= self.next:
            self.next = (self.documents // self.interval + 1) * self.interval
            print(f"processed {self.documents} documents ({self.bytes / 1e6:.1f} MB): {self.rates()}",
                  file=sys.stderr, flush=True)

    def rates(self) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        return (f"{self.documents / elapsed:.0f} docs/s, {self.bytes / 1e6 / elapsed:.2f} MB/s, "
                f"{self.tokens / elapsed:.0f} tokens/s")


def run(args) -> int:
    splitter_spec = None
    if args.split_sentences:
        from megatron_mellama.data.sentence_split import load_splitter_spec

        splitter_spec = load_splitter_spec(args.lang, args.keep_newlines,
                                           sample_texts(args.inputs, args.json_keys, max_chars=4_000_000,
                                                        max_line_bytes=args.max_line_bytes))
        print(f"sentence splitter: {splitter_spec.description}", flush=True)
    dtype = optimal_dtype(args.tokenizer.vocab_size)
    level = "sentence" if args.split_sentences else "document"
    writers = {key: IndexedWriter(f"{args.output_prefix}_{key}_{level}.bin",
                                  f"{args.output_prefix}_{key}_{level}.idx", dtype) for key in args.json_keys}
    rejected_path = f"{args.output_prefix}_rejected.jsonl"
    rejected_tmp = temp_path(os.path.dirname(os.path.abspath(rejected_path)), os.path.basename(rejected_path), ".tmp")
    rejected = open(rejected_tmp, "w", encoding="utf-8")
    init_args = (args.tokenizer_type, args.tokenizer_model, args.json_keys, args.append_eod, splitter_spec, dtype)
    progress = _Progress(args.log_interval)
    n_rejected = 0
    committed = False
    try:
        with contextlib.closing(_encoded_blocks(args, init_args)) as results:
            for result in results:
                path = args.inputs[result.file_index]
                for line, reason in result.rejects:
                    if args.strict:
                        print(f"{PROG}: error: {path}:{line}: {reason} (--strict: no output written)",
                              file=sys.stderr)
                        return 1
                    rejected.write(json.dumps({"file": path, "line": line, "reason": reason}) + "\n")
                n_rejected += len(result.rejects)
                for key, out in result.outputs.items():
                    writers[key].add_batch(out.tokens, out.sequence_lengths, out.document_sequence_counts)
                progress.update(result)
        rejected.close()
        for writer in writers.values():
            writer.finalize()
        for writer in writers.values():
            writer.commit()
        os.replace(rejected_tmp, rejected_path)
        committed = True
    finally:
        if not committed:
            rejected.close()
            for writer in writers.values():
                writer.abort()
            if os.path.exists(rejected_tmp):
                os.remove(rejected_tmp)
    for key, writer in writers.items():
        print(f"{key}: {progress.documents} documents, {writer.sequence_count} sequences, {writer.token_count} "
              f"tokens -> {args.output_prefix}_{key}_{level}.{{bin,idx}}")
    print(f"done: {progress.bytes / 1e6:.1f} MB in {time.time() - progress.start:.1f} s, {progress.rates()}")
    if n_rejected:
        print(f"skipped {n_rejected} unusable records; file and line of each in {rejected_path}")
    return 0


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    return run_tool(PROG, lambda: parse_args(argv), _run_until_signalled)


def _run_until_signalled(args) -> int:
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output written", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{PROG}: terminated; no output written", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
