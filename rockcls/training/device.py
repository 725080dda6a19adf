"""Which device and autocast dtype a run uses (auto: CUDA, then MPS, then CPU; bf16 where supported)."""

from __future__ import annotations

import ctypes
import os

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
    that way, resnet10t 1.2x (docs/benchmarks.md, section 3, CPU speed); MPS keeps NCHW."""
    return device.type in ("cuda", "cpu")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_allocator_tuned = False


def keep_freed_memory() -> bool:
    """Let glibc keep the memory torch frees on the CPU instead of unmapping it each step.

    By default glibc serves every buffer over its mmap threshold (128 KiB, adapting up to 32 MB) with
    a fresh mapping and unmaps it on free, so each training step page-faults its activations back in: on 2 cores half the CPU time of an
    efficientnet_lite0 fine-tune at 192 px went to the kernel. Raising the mmap and trim thresholds
    keeps those pages in the heap for the next step (training 1.3-1.9x faster there; the resident
    memory stays at its peak instead). A no-op without glibc, when another allocator is preloaded
    (jemalloc, tcmalloc) or with ROCKCLS_MALLOC_TUNING=0. Returns whether it changed anything.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if os.environ.get("ROCKCLS_MALLOC_TUNING", "1") == "0" or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _allocator_tuned = bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    return _allocator_tuned
