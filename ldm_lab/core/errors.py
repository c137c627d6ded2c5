"""The error a user caused and can fix (a value, a file, a folder of the wrong kind), told apart from a bug:
run.py shows it as one ``error: ...`` line and exits 2, with the traceback under ``HYDRA_FULL_ERROR=1``."""


class ConfigError(ValueError):
    """A value, file or folder the run cannot work with; the message names the key or path and the fix."""


def user_error(error: BaseException) -> ConfigError | None:
    """The :class:`ConfigError` behind ``error``, also when Hydra's instantiate wrapped it (its ``__cause__``)."""
    while error is not None:
        if isinstance(error, ConfigError):
            return error
        error = error.__cause__
    return None


class MissingPathError(ConfigError, FileNotFoundError):
    """A file or folder the run needs is absent or holds nothing usable."""
