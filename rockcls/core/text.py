"""File names as text: how a name is shown in a one-line message and written into UTF-8 files.

On Linux a file name is bytes; Python gives a name that is not valid UTF-8 (``b'\\xff.png'``) as
a str with surrogate escapes (``'\\udcff.png'``), which opens the file but cannot be encoded into
a CSV, a log file or the tracking store. Such names are shown with ``ascii()`` and written with
``\\xNN`` escapes, so no command ends in a UnicodeEncodeError."""

from __future__ import annotations


def is_utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (False for a file name that is not valid UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(name: str) -> str:
    """``name`` as it appears in a one-line message: itself, or ``ascii(name)`` when unprintable."""
    return name if name.isprintable() else ascii(name)


def utf8_escaped(name: str) -> str:
    """``name`` itself when it is valid UTF-8; otherwise its bytes as UTF-8 text with each
    invalid byte written ``\\xNN`` and each backslash doubled, so the escaped form decodes back to
    the exact bytes (``codecs.escape_decode``)."""
    if is_utf8(name):
        return name
    try:
        raw = name.encode("utf-8", "surrogateescape")  # the name's bytes on disk
    except UnicodeEncodeError:  # a lone surrogate that came from text, not from a file name
        raw = name.encode("utf-8", "surrogatepass")
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def hash_bytes(text: str) -> bytes:
    """``text`` as bytes to hash: its UTF-8 when valid; never fails, and distinct texts stay distinct."""
    return text.encode("utf-8", "surrogatepass")
