"""Errors that reach the user as one line, without a traceback."""


class RockclsError(Exception):
    """Base for every error caused by the user's input (data, parameters, run ids)."""


class ConfigError(RockclsError):
    """A parameter is unknown or its value is ill-typed or out of range."""


class DataError(RockclsError):
    """The dataset cannot be used as given (bad images, empty classes, bad CSV)."""


class RunStopped(Exception):
    """Raised on purpose to stop a run early (a pruned trial): its runs end KILLED, not FAILED."""
