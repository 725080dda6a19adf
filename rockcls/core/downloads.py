"""Where artifacts downloaded without a destination go: one folder per process, removed at exit;
the folders of processes killed before they could exit are removed by the next one."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path


DOWNLOADS_PREFIX = "rockcls-downloads-"


_download_roots: dict[int, Path] = {}


def download_root() -> Path:
    """One folder per process (a forked child makes its own), removed at exit; the folders of
    processes that died without exiting (killed) are removed by the next process that downloads."""
    pid = os.getpid()
    if pid not in _download_roots:
        _remove_orphaned_downloads()
        _download_roots[pid] = Path(tempfile.mkdtemp(prefix=f"{DOWNLOADS_PREFIX}{pid}-"))
        atexit.register(_remove_download_root, pid)
    return _download_roots[pid]


def _remove_download_root(pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child that inherited the handler
        shutil.rmtree(_download_roots.pop(pid), ignore_errors=True)


def _remove_orphaned_downloads() -> None:
    for folder in Path(tempfile.gettempdir()).glob(f"{DOWNLOADS_PREFIX}*-*"):
        pid = folder.name[len(DOWNLOADS_PREFIX):].split("-", 1)[0]
        with contextlib.suppress(OSError):
            if pid.isdigit() and folder.stat().st_uid == os.getuid() and not _alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
