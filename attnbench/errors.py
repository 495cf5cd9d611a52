"""The one exception type users see: bad input, named and with a fix, raised before any work starts."""


class AttnbenchError(Exception):
    """A user-facing error. The CLI prints its message and exits with code 2."""


class ConfigError(AttnbenchError):
    """A configuration key, type or combination is invalid."""
