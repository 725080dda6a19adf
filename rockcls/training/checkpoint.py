"""Checkpoints: plain dicts of tensors and builtins, written atomically, read with weights_only."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from rockcls.core.errors import RockclsError, first_line


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
    """The checkpoint at ``path``; anything else there (a pickle that would run code, a torn or
    foreign file, tensors larger than their data) is one line naming the file."""
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RockclsError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as exc:
        raise RockclsError(f"checkpoint {path} refused: it holds {_refused_object(exc)}, which a checkpoint "
                           f"never does (damaged or tampered with; loading it would run code)") from None
    except Exception as exc:  # torch raises many types for a torn or foreign file
        raise RockclsError(f"checkpoint {path} cannot be read: {first_line(exc, 240)}") from None
    if not isinstance(ck, dict):
        raise RockclsError(f"checkpoint {path} holds a {type(ck).__name__}, not a checkpoint dict")
    for name, tensor in _tensors(ck):
        if tensor.untyped_storage().nbytes() < _claimed_bytes(tensor):
            raise RockclsError(f"checkpoint {path} is damaged: tensor {name} claims shape "
                               f"{tuple(tensor.shape)} but holds {tensor.untyped_storage().nbytes()} bytes")
    return ck


def load_weights(module: torch.nn.Module, state: Any, path: str | os.PathLike, what: str = "model") -> None:
    """``module.load_state_dict(state)``, or one line naming the file whose weights do not fit."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError, ValueError) as exc:
        raise RockclsError(f"checkpoint {path}: its {what} state does not fit ({first_line(exc, 240)})") from None


def _refused_object(exc: pickle.UnpicklingError) -> str:
    # torch's message is 30 lines that end up suggesting weights_only=False: keep only what it refused.
    found = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", str(exc))
    return found.group(1) if found else "an object that is not a tensor or plain value"


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for k, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}[{k}]")


def _claimed_bytes(tensor: torch.Tensor) -> int:
    """Bytes the tensor's values would take. Weights and optimizer state are stored whole, so a tensor
    that claims more than its data (a zero stride makes a huge shape cost nothing) is forged, and
    would make the model it describes allocate that much."""
    if tensor.numel() == 0:
        return 0
    reach = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())) + 1
    return max(tensor.numel(), tensor.storage_offset() + reach) * tensor.element_size()
