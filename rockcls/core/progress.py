"""Progress bars on a terminal, a few plain log lines otherwise (CI, mlflow run, files)."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

from rockcls.core import secrets

T = TypeVar("T")
log = logging.getLogger("rockcls")


def track(items: Iterable[T], *, total: int, desc: str) -> Iterator[T]:
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)
        return
    # Off a terminal: a line at most every 30 s, so long epochs show life and short ones stay quiet.
    start = last = time.perf_counter()
    for n, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= 30.0:
            log.info("%s: %d/%d (%.0fs)", desc, n, total, now - start)
            last = now


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "urllib3", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    secrets.install_log_filter()
    route_warnings()


def route_warnings() -> None:
    """Python warnings (a library's UserWarning, a deprecation) become one log line each, like
    the rest of the output, instead of ``/path/file.py:95: UserWarning: ...`` and a source line."""
    warnings.showwarning = log_warning


def log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    log.warning("%s%s: %s", category.__name__, warning_origin(filename), message)


def warning_origin(filename: str) -> str:
    """`` (from <package>)`` for a warning raised inside an installed package: who to blame,
    without the file path."""
    parts = os.path.normpath(filename).split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return f" (from {os.path.splitext(parts[parts.index(marker) + 1])[0]})"
    return ""
