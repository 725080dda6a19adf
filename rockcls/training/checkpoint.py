"""Checkpoints: plain dicts of tensors and builtins, written atomically, read with weights_only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rockcls.core.errors import RockclsError


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """torch.save to a temporary name, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
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


def write_npz_atomic(path: str | os.PathLike, **arrays: Any) -> Path:
    """``np.savez`` to a temporary name, then rename; the temporary file goes if the write fails."""
    import numpy as np

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RockclsError(f"checkpoint not found: {path}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise RockclsError(f"checkpoint {path} cannot be read: {str(exc).splitlines()[0][:200]}") from None
