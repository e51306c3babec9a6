"""What every command-line tool shares: bad flags are one line naming the flag, never a usage dump."""

import argparse


class UsageError(Exception):
    """A flag or input the tool cannot use; the message names it."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)
