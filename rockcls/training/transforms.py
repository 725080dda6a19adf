"""Augmentation presets: an albumentations part on the CPU (uint8 in, uint8 out) and a device part.

Pixel-order operations that commute with resizing (flips, 90-degree rotations, transpose) and
additive noise run on whole batches on the training device (`DeviceAugment`), so data-loader
workers only crop, resize and adjust colours. `dihedral` is shared with test-time augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from rockcls.core.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Test-time views as indices into `dihedral`: 5 is the horizontal flip, 7 the vertical flip.
TTA_VIEWS: dict[str, tuple[int, ...]] = {"none": (0,), "flip": (0, 5, 7), "d4": tuple(range(8))}


class RandomCenterCrop(A.ImageOnlyTransform):
    """Centre crop whose side is a random fraction of the shorter side (the seed's crop)."""

    def __init__(self, scale: tuple[float, float] = (0.6, 1.0), p: float = 1.0):
        super().__init__(p=p)
        self.scale = scale

    def get_params(self) -> dict[str, float]:
        return {"s": self.py_random.uniform(*self.scale)}

    def apply(self, img: np.ndarray, s: float = 1.0, **_: Any) -> np.ndarray:
        h, w = img.shape[:2]
        side = max(1, int(round(min(h, w) * s)))
        top, left = (h - side) // 2, (w - side) // 2
        return img[top:top + side, left:left + side]


class PadToSquare(A.ImageOnlyTransform):
    """Zero-pad the shorter side so resizing keeps the aspect ratio (the contest winner's step)."""

    def __init__(self, p: float = 1.0):
        super().__init__(p=p)

    def apply(self, img: np.ndarray, **_: Any) -> np.ndarray:
        h, w = img.shape[:2]
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        return cv2.copyMakeBorder(img, top, side - h - top, left, side - w - left,
                                  cv2.BORDER_CONSTANT, value=0)


@dataclass(frozen=True)
class DeviceAugmentSpec:
    """Batch-level augmentation on the device; probabilities per sample."""

    hflip: float = 0.0
    vflip: float = 0.0
    rot90: bool = False
    noise: float = 0.0
    noise_std: tuple[float, float] = (10 / 255, 25 / 255)


def _cpu_steps(name: str, size: int) -> list[A.BasicTransform]:
    if name in ("none", "d4"):
        return [A.Resize(size, size)]
    if name == "crop":
        return [A.RandomResizedCrop((size, size), scale=(0.35, 1.0), ratio=(0.75, 1.333))]
    if name == "light":
        return [A.RandomResizedCrop((size, size), scale=(0.6, 1.0), ratio=(0.9, 1.1))]
    if name == "seed":
        return [RandomCenterCrop(scale=(0.6, 1.0)), A.Resize(size, size), A.CLAHE(p=0.3)]
    if name == "winner":
        return [PadToSquare(), A.RandomResizedCrop((size, size), scale=(0.4, 1.0)),
                A.RandomBrightnessContrast(p=0.5), A.GridDropout(ratio=0.3, p=0.3)]
    raise ConfigError(f"augment: unknown preset {name!r} ({', '.join(DEVICE_SPECS)})")


DEVICE_SPECS = {
    "none": DeviceAugmentSpec(),
    "d4": DeviceAugmentSpec(hflip=0.5, vflip=0.5, rot90=True),
    "crop": DeviceAugmentSpec(hflip=0.5, vflip=0.5, rot90=True),
    "light": DeviceAugmentSpec(hflip=0.5, vflip=0.5),
    "seed": DeviceAugmentSpec(hflip=0.5, vflip=0.5, noise=0.3),
    "winner": DeviceAugmentSpec(hflip=0.5, vflip=0.5, rot90=True),
}


def build_train_transform(name: str, img_size: int) -> A.Compose:
    return A.Compose(_cpu_steps(name, img_size))


def build_eval_transform(name: str, img_size: int) -> A.Compose:
    steps: list[A.BasicTransform] = [PadToSquare()] if name == "winner" else []
    return A.Compose(steps + [A.Resize(img_size, img_size)])


def build_device_augment(name: str) -> DeviceAugmentSpec:
    if name not in DEVICE_SPECS:
        raise ConfigError(f"augment: unknown preset {name!r} ({', '.join(DEVICE_SPECS)})")
    return DEVICE_SPECS[name]


def dihedral(x: torch.Tensor, view: int) -> torch.Tensor:
    """View 0..7 of the dihedral group on the last two dims: rot90 by view%4, then a transpose if >=4."""
    y = torch.rot90(x, view % 4, dims=(-2, -1)) if view % 4 else x
    return y.transpose(-2, -1) if view >= 4 else y


def tta_views(name: str) -> tuple[int, ...]:
    if name not in TTA_VIEWS:
        raise ConfigError(f"tta: must be one of {', '.join(TTA_VIEWS)}; got {name!r}")
    return TTA_VIEWS[name]


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 NCHW -> float NCHW, scaled and standardised."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return (x.float() - m) / s


class DeviceAugment:
    """Per-sample random flips / rotations / Gaussian noise applied to a uint8 batch on its device."""

    def __init__(self, spec: DeviceAugmentSpec, seed: int = 0):
        self.spec = spec
        self.gen = torch.Generator().manual_seed(seed)

    def _mask(self, n: int, p: float) -> torch.Tensor:
        return torch.rand(n, generator=self.gen) < p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: uint8 NCHW. Returns float NCHW in [0, 255] (noise needs float)."""
        n, s = x.shape[0], self.spec
        x = x.clone()  # flips and rotations move uint8: a quarter of the bytes of float32
        for mask, dim in ((self._mask(n, s.hflip), -1), (self._mask(n, s.vflip), -2)):
            if mask.any():
                idx = mask.nonzero().flatten().to(x.device)
                x[idx] = x[idx].flip(dim)
        if s.rot90 and x.shape[-1] == x.shape[-2]:
            ks = torch.randint(0, 4, (n,), generator=self.gen)
            for k in (1, 2, 3):
                idx = (ks == k).nonzero().flatten().to(x.device)
                if len(idx):
                    x[idx] = torch.rot90(x[idx], k, dims=(-2, -1))
        out = x.float()
        if s.noise > 0:
            out = self._add_noise(out)
        return out

    def _add_noise(self, out: torch.Tensor) -> torch.Tensor:
        n = out.shape[0]
        lo, hi = self.spec.noise_std
        std = (torch.rand(n, generator=self.gen) * (hi - lo) + lo) * 255.0
        picked = self._mask(n, self.spec.noise).nonzero().flatten()
        seed = int(torch.randint(0, 2**31, (1,), generator=self.gen))
        if len(picked) == 0:
            return out
        # Noise only for the picked samples: drawing it for the whole batch was most of the cost.
        gen = torch.Generator(device=out.device).manual_seed(seed)
        noise = torch.randn((len(picked), *out.shape[1:]), generator=gen, device=out.device)
        idx = picked.to(out.device)
        out[idx] = (out[idx] + noise * std[picked].to(out.device).view(-1, 1, 1, 1)).clamp_(0.0, 255.0)
        return out
