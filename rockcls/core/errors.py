"""Errors that reach the user as one line, without a traceback."""


class RockclsError(Exception):
    """Base for every error caused by the user's input (data, parameters, run ids)."""


class ConfigError(RockclsError):
    """A parameter is unknown or its value is ill-typed or out of range."""


class DataError(RockclsError):
    """The dataset cannot be used as given (bad images, empty classes, bad CSV)."""


class RunStopped(Exception):
    """Raised on purpose to stop a run early (a pruned trial): its runs end KILLED, not FAILED."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters; its type name when the
    message is empty. A first line that ends with ":" announces the next ("Error(s) in loading
    state_dict for X:"), which is then the one shown. The one way an exception from a library is
    shown inside a one-line error."""
    return first_line_of(str(exc), limit, fallback=type(exc).__name__)


def first_line_of(text: str, limit: int = 200, *, fallback: str = "") -> str:
    """`first_line` of a message given as text (``fallback`` when it has none)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    return (lines[0] if lines else fallback)[:limit]
