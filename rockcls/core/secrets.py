"""Passwords inside database and tracking URLs: masked wherever a URL is shown, logged or raised.

A URL is masked by `mask_url`; the passwords of every URL passed to `remember` (the study
storage, the tracking URI) are also replaced in free text (`hide`): in error lines, and in every
log record once `SecretFilter` sits on the log handlers, so a library message that quotes a URL
cannot print them either.
"""

from __future__ import annotations

import logging
import re

from rockcls.core.errors import first_line_of

MASK = "***"
STORAGE_ENV = "ROCKCLS_STORAGE"
_QUERY_SECRET = re.compile(r"([?&](?:password|passwd|pwd)=)([^&#]*)", re.IGNORECASE)
_known: set[str] = set()


def _user_info(url: str) -> tuple[str, str, str] | None:
    """(``scheme://``, user info, rest) of ``scheme://userinfo@rest``; None without user info.

    The user info ends at the LAST '@': generated passwords often hold '@', ':' or '/' unencoded,
    and parsers that stop at the first '@' then print the rest of the password as the host.
    An '@' later in the URL (in a path) makes this mask too much, never too little. A value
    without a scheme (a mistyped URL) is read the same way, so its error message masks it too.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    info, at, tail = rest.rpartition("@")
    return (scheme + sep, info, tail) if at else None


def url_secrets(url: str) -> list[str]:
    """The password(s) in ``url``: in the user info and in ``password=`` query parameters."""
    parts = _user_info(url)
    found = [parts[1].split(":", 1)[1]] if parts and ":" in parts[1] else []
    return [s for s in found + [m.group(2) for m in _QUERY_SECRET.finditer(url)] if s]


def mask_url(url: str) -> str:
    """``url`` with every password replaced by ***, for logs, tags, files and error messages."""
    parts = _user_info(url)
    if parts and ":" in parts[1]:
        url = f"{parts[0]}{parts[1].split(':', 1)[0]}:{MASK}@{parts[2]}"
    return _QUERY_SECRET.sub(rf"\g<1>{MASK}", url)


def remember(url: str) -> None:
    """From now on `hide` (and every filtered log handler) masks the passwords of ``url``."""
    # A one- or two-character password cannot be hidden in free text without mangling it; the
    # URL itself is still masked by `mask_url`.
    _known.update(s for s in url_secrets(url) if len(s) >= 3)


def hide(text: str) -> str:
    """``text`` with every remembered password replaced by ***."""
    # Longest first: a password that contains another one is replaced whole.
    for secret in sorted(_known, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


class SecretFilter(logging.Filter):
    """Masks remembered passwords in every record a handler emits (rockcls' and libraries')."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _known:
            message = record.getMessage()
            masked = hide(message)
            if masked != message:
                record.msg, record.args = masked, None
        return True


def hidden_first_line(exc: BaseException, limit: int = 200) -> str:
    """`errors.first_line` of ``exc`` with every remembered secret hidden first, so a password cut
    at the limit cannot show its start."""
    return first_line_of(hide(str(exc)), limit, fallback=type(exc).__name__)


def install_log_filter() -> None:
    """Put a `SecretFilter` on every handler of the root logger (once each)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, SecretFilter) for f in handler.filters):
            handler.addFilter(SecretFilter())
