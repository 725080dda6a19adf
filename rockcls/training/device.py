"""Which device and autocast dtype a run uses (auto: CUDA, then MPS, then CPU; bf16 where supported)."""

from __future__ import annotations

import torch

from rockcls.core.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: not a device name: {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available on this machine")
    return dev


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def use_channels_last(device: torch.device) -> bool:
    """NHWC tensors on CUDA and on the CPU (oneDNN): efficientnet_lite0 trains 3x faster on the CPU
    that way, resnet10t 1.2x (docs/benchmarks.md, section 3); MPS keeps NCHW."""
    return device.type in ("cuda", "cpu")
