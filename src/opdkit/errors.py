"""Exception types shared by every part of opdkit (no heavy imports)."""


class OpdkitError(Exception):
    """Base class of every error opdkit raises on purpose."""


class InputError(OpdkitError, ValueError):
    """A tensor or value handed to an opdkit function is not what it expects.

    The message names the argument and says what was expected.
    """


class ConfigError(OpdkitError, ValueError):
    """A configuration file or override is invalid (unknown key, bad type, out of range).

    The message names the full dotted key (and the file and line when known).
    """
