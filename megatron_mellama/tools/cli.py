"""What every command-line tool shares: bad flags are one line naming the flag, never a usage dump."""

import argparse
import sys

from ..errors import MellamaError


class UsageError(MellamaError):
    """A flag or input the tool cannot use; the message names it."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def run_tool(prog: str, parse, body, errors: tuple = ()) -> int:
    """`parse()` -> args, then `body(args)` -> exit code.

    A UsageError, or one of `errors`, is printed as `PROG: error: MESSAGE` and exits 2; `--help`
    returns 0 instead of raising SystemExit, so `main()` can be called from tests and scripts.
    """
    try:
        args = parse()
    except UsageError as e:
        return _fail(prog, e)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    try:
        return body(args)
    except (UsageError, *errors) as e:
        return _fail(prog, e)


def _fail(prog: str, error: Exception) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2
