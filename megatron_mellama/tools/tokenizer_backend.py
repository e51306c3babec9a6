"""`--tokenizer-backend`: which encoder the preprocessing tools tokenize with, chosen and checked
before any work.

`sentencepiece` is the reference. `gigatoken` (the `.[fast]` extra) is taken only for a
SentencePiece tokenizer whose normalization it reproduces, and only after it gives SentencePiece's
ids on `fast_tokenizer.hostile_strings()` and on the input's first million characters of text; during the run a share
of the texts (--tokenizer-check-fraction) is re-encoded with SentencePiece. `auto` takes gigatoken
where all of that holds and says in one line why not otherwise; `gigatoken` asked for by name and
not usable is an error.
"""

from __future__ import annotations

import os

from megatron_mellama.data.fast_tokenizer import (CHECK_FRACTION, GIGATOKEN_VERSION, START_CHECK_CHARS,
                                                  CheckedEncoder, GigatokenEncoder, gigatoken_json, start_check,
                                                  unsupported_reason)
from megatron_mellama.data.jsonl_reader import InputError, sample_texts
from megatron_mellama.data.tokenizer import HuggingFaceTokenizer
from megatron_mellama.tools.cli import UsageError
from megatron_mellama.tools.preprocess_run import PreprocessError

BACKENDS = ("auto", "sentencepiece", "gigatoken")
INSTALL = 'pip install -e ".[fast]"'


def add_flags(group) -> None:
    group.add_argument("--tokenizer-backend", choices=BACKENDS, default="auto",
                       help="what encodes text with a SentencePiece tokenizer: 'sentencepiece' (the reference), "
                            f"'gigatoken' (several times faster, the `{INSTALL}` extra; its ids are checked "
                            "against SentencePiece's before and during the run, and the run fails on any "
                            "difference), or 'auto' (default): gigatoken when installed and usable for this "
                            "model, otherwise sentencepiece, saying why")
    group.add_argument("--tokenizer-check-fraction", type=float, default=CHECK_FRACTION, metavar="F",
                       help="share of the texts the fast tokenizer encodes that are re-encoded with SentencePiece "
                            f"and compared during the run (default {CHECK_FRACTION}; 0 keeps only the check at "
                            "start)")


def _gigatoken_problem() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        installed = version("gigatoken")
    except PackageNotFoundError:
        return f"gigatoken is not installed ({INSTALL})"
    if installed != GIGATOKEN_VERSION:
        return f"gigatoken {installed} is installed; only {GIGATOKEN_VERSION} is checked against SentencePiece " \
               f"({INSTALL})"
    return None


def choose(args) -> None:
    """Sets `args.backend_spec` (what a worker needs to rebuild the fast encoder, or None) and
    `args.backend_line` (what the run prints); a fast encoder that passed its checks goes into
    `args.tokenizer`, wrapped to be rechecked during the run."""
    if not 0 <= args.tokenizer_check_fraction <= 1:
        raise UsageError(f"--tokenizer-check-fraction {args.tokenizer_check_fraction} must be between 0 and 1")
    args.backend_spec = None
    requested = args.tokenizer_backend
    if isinstance(args.tokenizer, HuggingFaceTokenizer):
        if requested != "auto":
            raise UsageError(f"--tokenizer-backend {requested}: --tokenizer-type {args.tokenizer_type} encodes with "
                             "Hugging Face tokenizers; the backends are for SentencePiece tokenizers")
        args.backend_line = f"tokenizer backend: Hugging Face (--tokenizer-type {args.tokenizer_type})"
        return
    if requested == "sentencepiece":
        args.backend_line = "tokenizer backend: sentencepiece (--tokenizer-backend sentencepiece)"
        return
    try:
        fast, spec, checked_chars = _checked_gigatoken(args)
    except _Unusable as why_not:
        if requested == "gigatoken":
            raise UsageError(f"--tokenizer-backend gigatoken: {why_not}") from None
        args.backend_line = f"tokenizer backend: sentencepiece ({why_not})"
        return
    fraction = args.tokenizer_check_fraction
    args.tokenizer.use_encoder(CheckedEncoder(fast, args.tokenizer.encoder, fraction))
    args.backend_spec = (spec, fraction)
    during = f"{fraction:.2%}".replace(".00%", "%") + " of the texts rechecked during the run" if fraction \
        else "no recheck during the run: --tokenizer-check-fraction 0"
    size = f"{checked_chars / 1e6:.1f}M characters" if checked_chars >= 100_000 else f"{checked_chars:,} characters"
    args.backend_line = (f"tokenizer backend: gigatoken {GIGATOKEN_VERSION} (SentencePiece's ids on the hostile "
                         f"strings and the input's first {size} of text; {during})")


class _Unusable(Exception):
    """Why gigatoken cannot encode for this run."""


def _checked_gigatoken(args):
    """(gigatoken encoder, its tokenizer.json, characters of the input checked) once it has given
    SentencePiece's ids on the hostile strings and the input's first million characters; _Unusable otherwise."""
    problem = _gigatoken_problem()
    if problem:
        raise _Unusable(problem)
    with open(args.tokenizer.model_path, "rb") as f:
        model_proto = f.read()
    problem = unsupported_reason(model_proto)
    if problem:
        raise _Unusable(f"gigatoken does not reproduce this model's encoding exactly: {problem}")
    try:
        spec = gigatoken_json(model_proto)
        fast = GigatokenEncoder(spec)
    except (ImportError, ValueError) as err:  # a broken install, or a model its converter refuses
        raise _Unusable(f"gigatoken could not be built for this model: {' '.join(str(err).split())}") from None
    try:
        texts = [t for t in sample_texts(args.inputs, None, START_CHECK_CHARS, args.max_line_bytes) if _encodable(t)]
    except InputError:  # the run itself fails on it, naming the file
        texts = []
    difference = start_check(fast, args.tokenizer.encoder, texts)
    if difference:
        raise _Unusable(f"checked before the run, {difference}")
    return fast, spec, sum(map(len, texts))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: the run rejects such a record
        return False
    return True


def mismatch_error(path: str, line: int, difference: str) -> PreprocessError:
    """The run's end when the sampled check finds gigatoken's ids differ: before anything is committed."""
    return PreprocessError(f"{path}:{line}: {difference}; the run stops (use --tokenizer-backend sentencepiece); "
                           "no output written, existing outputs untouched")


def exactness_line(encoded: int, checked: int, seconds: float, whose: str = "") -> str:
    """What a run that used the fast tokenizer says of its sampled check at the end."""
    return (f"exactness: {checked} of {encoded} texts the fast tokenizer encoded were re-encoded with SentencePiece, "
            f"in {seconds:.2f} s{whose}; all equal")


def install(tokenizer, backend_spec, seed: int | None = None) -> None:
    """In a worker process: the fast encoder `choose` settled on, rebuilt and checked as in the parent."""
    if backend_spec is None:
        return
    spec, fraction = backend_spec
    tokenizer.use_encoder(CheckedEncoder(GigatokenEncoder(spec), tokenizer.encoder, fraction,
                                         seed=os.getpid() if seed is None else seed))
