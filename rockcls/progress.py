"""Progress bars on a terminal, a few plain log lines otherwise (CI, mlflow run, files)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

from rockcls import secrets

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
