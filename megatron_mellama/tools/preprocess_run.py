"""How a run of `preprocess_data` or `preprocess_sft` ends: under the output prefix's lock, with its
rejected records held against --max-reject-fraction, and a failure, SIGTERM or Ctrl-C as one line and
an exit code, the outputs unwritten.
"""

from __future__ import annotations

import collections
import re
import signal
import sys
import zlib

from megatron_mellama.data.indexed_writer import OutputLocked, output_lock
from megatron_mellama.data.jsonl_reader import InputError

from ..errors import MellamaError

GZIP_MAGIC = b"\x1f\x8b"


class Terminated(Exception):
    """SIGTERM, raised in the main process so the cleanup path runs."""


class PreprocessError(MellamaError):
    """A run that cannot produce good outputs; one line, exit 1, existing outputs untouched."""


def under_output_lock(run_locked, args) -> int:
    """`run_locked(args)` holding `--output-prefix`'s lock: a second run for the same prefix fails at once."""
    try:
        with output_lock(args.output_prefix):
            return run_locked(args)
    except OutputLocked as err:
        raise PreprocessError(f"--output-prefix {args.output_prefix}: {err}") from None


class Rejects:
    """Counts rejected records by kind of reason and keeps the first few, for the threshold's message."""

    FIRST = 3

    def __init__(self):
        self.count = 0
        self.kinds = collections.Counter()
        self.first = []

    def add(self, path, line, reason):
        self.count += 1
        self.kinds[re.split(r": | at | \(", reason)[0]] += 1
        if len(self.first) < self.FIRST:
            self.first.append(f"{path}:{line}: {reason}")

    def check(self, args, accepted: int) -> None:
        """Raise PreprocessError when every record, or more than --max-reject-fraction of them, was
        rejected: such a run is almost always the wrong input, and must not replace good outputs."""
        total = accepted + self.count
        if not self.count or (accepted and self.count <= args.max_reject_fraction * total):
            return
        share = "all" if not accepted else f"{self.count / total:.1%}, more than --max-reject-fraction " \
                                           f"{args.max_reject_fraction}"
        gz = [p for p in args.inputs if not p.endswith(".gz") and _starts_with(p, GZIP_MAGIC)]
        if gz:
            why = f"{gz[0]} starts with gzip's magic bytes 1f 8b: name it .gz"
        else:
            kinds = ", ".join(f"{kind} x {n}" for kind, n in self.kinds.most_common(3))
            why = f"reasons: {kinds}; first: {'; '.join(self.first)}"
        raise PreprocessError(f"{self.count} of {total} records rejected ({share}): {why}; "
                              "no output written, existing outputs untouched")


def _starts_with(path: str, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}" + (f": {err.filename}" if err.filename else "")
    return " ".join(str(err).split()) or type(err).__name__


def _raise_terminated(signum, frame):
    raise Terminated()


def run_until_signalled(prog: str, run_fn, args) -> int:
    """`run_fn(args)` of a preprocessing tool, with SIGTERM, Ctrl-C and a failure each ending as one
    line and an exit code; the tool's outputs stay unwritten (its temporaries are its own to remove)."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return run_fn(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no output written", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated; no output written", file=sys.stderr)
        return 143
    except (PreprocessError, InputError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except (OSError, EOFError, zlib.error) as err:  # a full disk, an unreadable or corrupt input
        print(f"{prog}: error: {one_line(err)}; no output written, temporary files removed", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
