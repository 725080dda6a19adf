"""Device lists of the commands that start one process per device (`train --devices`, the study's
`--devices`): parsing them, and the environment that pins a child process to its device."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from rockcls.core.errors import ConfigError


def parse_devices(text: str, *, option: str = "devices") -> list[str]:
    """``0,1`` -> one process each (no GPU twice); ``cpu`` entries -> CPU processes."""
    devices = []
    for token in (t.strip().lower() for t in text.split(",") if t.strip()):
        token = token.removeprefix("cuda:")
        if token != "cpu" and not token.isdigit():
            raise ConfigError(f"{option}: {token!r} is neither a GPU id (0, 1, ...) nor 'cpu'")
        if token != "cpu" and token in devices:
            raise ConfigError(f"{option}: GPU {token} listed twice (one process per GPU)")
        devices.append(token)
    gpus = [d for d in devices if d != "cpu"]
    if gpus:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{option}: GPU(s) {','.join(gpus)} requested but CUDA is not available here")
        bad = [d for d in gpus if int(d) >= count]
        if bad:
            raise ConfigError(f"{option}: GPU {bad[0]} does not exist (this machine shows {count})")
    return devices


def device_env(device: str, devices: Sequence[str], parent: Mapping[str, str]) -> dict[str, str]:
    """The environment of the child process on ``device``: pinned to its GPU (ids count within the
    parent's CUDA_VISIBLE_DEVICES), or a CPU process with its share of the cores."""
    env = dict(parent)
    if device == "cpu":
        threads = str(max(1, (os.cpu_count() or 1) // max(1, sum(d == "cpu" for d in devices))))
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        return env
    visible = [v.strip() for v in parent.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    env["CUDA_VISIBLE_DEVICES"] = visible[int(device)] if visible else device
    return env


def child_device(device: str) -> str:
    """The ``device`` option of the child started on list entry ``device`` (its GPU is its only one)."""
    return "cpu" if device == "cpu" else "cuda"
