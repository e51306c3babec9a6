from ..errors import MellamaError


class ConfigError(MellamaError, ValueError):
    """A configuration the run cannot use; the message is one line that names the flag or file."""
