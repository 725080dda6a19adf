"""Checkpoints: plain dicts of tensors and builtins, written atomically, read with weights_only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rockcls.errors import RockclsError


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """torch.save to a temporary name, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RockclsError(f"checkpoint not found: {path}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise RockclsError(f"checkpoint {path} cannot be read: {str(exc).splitlines()[0][:200]}") from None
