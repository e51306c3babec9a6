"""JSONL corpora -> megatron-core IndexedDataset files (.bin/.idx), with Megatron-LM's flags.

    mellama-preprocess-data --input 'corpus/*.jsonl.gz' --output-prefix data/bio \\
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --workers 16 --append-eod

writes `data/bio_text_document.{bin,idx}` (`_sentence` with --split-sentences), one pair per
--json-keys key, `data/bio_text_document.tokens.json` (smallest and largest token id, which training
checks against the model's vocabulary), and `data/bio_rejected.jsonl` listing records that were
skipped. Outputs appear under their final names only when the run succeeds: a failure (a full disk
included) removes every temporary file and exits 1 with one line, and so does a run that rejects all
its records or more than --max-reject-fraction of them (what the rejects looked like is in the line).
A run holds `data/bio.lock` (fcntl.flock) from start to commit, so a second run for the same prefix
fails at once instead of leaving a .bin of one run beside the .idx of the other. A JSONL line longer than
--max-line-bytes is rejected unread, so memory stays bounded for any input. With the `.[fast]` extra a
SentencePiece tokenizer encodes through gigatoken (`--tokenizer-backend`, several times faster, the
same bytes out), its ids checked against SentencePiece's before and during the run.
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
from megatron_mellama.data.jsonl_reader import read_blocks, sample_texts
from megatron_mellama.data.record_encoder import RecordEncoder
from megatron_mellama.data.tokenizer import build_tokenizer
from megatron_mellama.tools import preprocess_flags as flags
from megatron_mellama.tools import tokenizer_backend
from megatron_mellama.tools.cli import OneLineParser, UsageError, run_tool
from megatron_mellama.tools.preprocess_run import Rejects, run_until_signalled, under_output_lock

PROG = "mellama-preprocess-data"
BLOCKS_IN_FLIGHT_PER_WORKER = 4  # bounds memory: the reader never runs ahead of the workers by more


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    flags.add_input(g)
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract; one output per key")
    g.add_argument("--split-sentences", action="store_true", help="one sequence per sentence (nltk Punkt)")
    g.add_argument("--keep-newlines", action="store_true", help="keep newlines between sentences when splitting")
    g.add_argument("--lang", default="english", help="Punkt language for --split-sentences")
    flags.add_max_line_bytes(g)
    g = p.add_argument_group("tokenizer")
    flags.add_tokenizer(g, model_required=False)
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    g = p.add_argument_group("output data")
    flags.add_output(g)
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    flags.add_runtime(g, counted="documents")
    return p


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise UsageError(f"--workers {args.workers} must be at least 1")
    return flags.check_common_args(args)


# Worker side: one encoder per process, built once.
_ENCODER = None


def _init_worker(*init_args):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler came along with fork
    _init_encoder(*init_args)


def _init_encoder(tokenizer_type, tokenizer_model, backend_spec, json_keys, append_eod, splitter_spec, dtype,
                  tokenizer=None):
    global _ENCODER
    from megatron_mellama.data.sentence_split import SentenceSplitter, identity_split

    if tokenizer is None:
        tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
        tokenizer_backend.install(tokenizer, backend_spec)
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
    return under_output_lock(_run_locked, args)


def _run_locked(args) -> int:
    splitter_spec = None
    if args.split_sentences:
        from megatron_mellama.data.sentence_split import load_splitter_spec

        splitter_spec = load_splitter_spec(args.lang, args.keep_newlines,
                                           sample_texts(args.inputs, args.json_keys, max_chars=4_000_000,
                                                        max_line_bytes=args.max_line_bytes))
        print(f"sentence splitter: {splitter_spec.description}", flush=True)
    dtype = optimal_dtype(args.tokenizer.vocab_size)
    level = "sentence" if args.split_sentences else "document"
    rejected_path = f"{args.output_prefix}_rejected.jsonl"
    init_args = (args.tokenizer_type, args.tokenizer_model, args.backend_spec, args.json_keys, args.append_eod,
                 splitter_spec, dtype)
    print(args.backend_line, flush=True)
    progress = _Progress(args.log_interval)
    rejects = Rejects()
    encoded = checked = 0
    check_seconds = 0.0
    writers = {}
    rejected = rejected_tmp = None
    committed = False
    try:  # from the first temporary file on: any failure removes them all (see indexed_writer)
        for key in args.json_keys:
            writers[key] = IndexedWriter(f"{args.output_prefix}_{key}_{level}.bin",
                                         f"{args.output_prefix}_{key}_{level}.idx", dtype)
        rejected_tmp = temp_path(os.path.dirname(os.path.abspath(rejected_path)), os.path.basename(rejected_path),
                                 ".tmp")
        rejected = open(rejected_tmp, "w", encoding="utf-8")
        with contextlib.closing(_encoded_blocks(args, init_args)) as results:
            for result in results:
                path = args.inputs[result.file_index]
                if result.mismatch:
                    raise tokenizer_backend.mismatch_error(path, *result.mismatch)
                encoded += result.encoded
                checked += result.checked
                check_seconds += result.check_seconds
                for line, reason in result.rejects:
                    if args.strict:
                        print(f"{PROG}: error: {path}:{line}: {reason} (--strict: no output written)",
                              file=sys.stderr)
                        return 1
                    rejected.write(json.dumps({"file": path, "line": line, "reason": reason}) + "\n")
                    rejects.add(path, line, reason)
                for key, out in result.outputs.items():
                    writers[key].add_batch(out.tokens, out.sequence_lengths, out.document_sequence_counts)
                progress.update(result)
        rejects.check(args, progress.documents)
        rejected.close()
        for writer in writers.values():
            writer.finalize()
        for writer in writers.values():
            writer.commit()
        os.replace(rejected_tmp, rejected_path)
        committed = True
    finally:
        if not committed:
            if rejected is not None:
                with contextlib.suppress(OSError):
                    rejected.close()
            for writer in writers.values():
                writer.abort()
            if rejected_tmp is not None:
                with contextlib.suppress(OSError):
                    os.remove(rejected_tmp)
    for key, writer in writers.items():
        print(f"{key}: {progress.documents} documents, {writer.sequence_count} sequences, {writer.token_count} "
              f"tokens -> {args.output_prefix}_{key}_{level}.{{bin,idx}}")
    print(f"done: {progress.bytes / 1e6:.1f} MB in {time.time() - progress.start:.1f} s, {progress.rates()}")
    if encoded:
        print(tokenizer_backend.exactness_line(encoded, checked, check_seconds, " of worker time"))
    if rejects.count:
        print(f"skipped {rejects.count} unusable records; file and line of each in {rejected_path}")
    return 0


def main(argv=None) -> int:
    return run_tool(PROG, lambda: parse_args(argv), lambda args: run_until_signalled(PROG, run, args))


if __name__ == "__main__":
    sys.exit(main())
