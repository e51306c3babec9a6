"""The root of every error this project raises for its users.

Each error's message is one line that names the flag, file or step and what was expected; a
command catches `MellamaError` once and prints that line. Subclasses keep their older built-in
bases (most are `ValueError`), so code that caught those still does.
"""


class MellamaError(Exception):
    """An error whose message is meant for the user as it is: one line, no traceback needed."""
