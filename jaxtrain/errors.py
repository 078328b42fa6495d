"""User-facing errors: bad configs, data or paths.

The CLI turns any `UserError` into one line on stderr and exit status 2, without a
traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user. `str(error)` is the one line shown to them."""

    exit_code = 2


class ConfigError(UserError):
    """A config key has a bad value. `key` is the dotted path, e.g. `model.n_heads`."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class DataError(UserError):
    """The corpus or a data path cannot be used."""
