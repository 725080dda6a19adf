"""Checkpoints: plain dicts of tensors and builtins, written atomically, read with weights_only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from rockcls.core.errors import RockclsError


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """torch.save to a temporary name, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_atomic(path, ".tmp", lambda fh: torch.save(payload, fh))


def write_npz_atomic(path: str | os.PathLike, **arrays: Any) -> Path:
    """``np.savez`` to a temporary name, then rename; the temporary file goes if the write fails."""
    import numpy as np

    return _write_atomic(Path(path), ".tmp.npz", lambda fh: np.savez(fh, **arrays))


def _write_atomic(path: Path, suffix: str, write: Callable[[Any], None]) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}{suffix}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves no partial file behind
    return path


def _write_error(path: Path, exc: OSError) -> RockclsError:
    """Disk full and the like: one line; the previous file under that name is still whole."""
    return RockclsError(f"checkpoint: cannot write {path} ({exc.strerror or exc}); the previous "
                        f"checkpoint is kept: free space and resume")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RockclsError(f"checkpoint not found: {path}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise RockclsError(f"checkpoint {path} cannot be read: {str(exc).splitlines()[0][:200]}") from None
