"""Synthetic 'rock texture' datasets for the demo and the tests (clearly not real data)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# Each class is a texture family; orientation is random, as in real rock photos.
TEXTURES = ("synthetic_banded", "synthetic_grainy", "synthetic_speckled", "synthetic_veined", "synthetic_blotchy")


def _texture(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == 0:
        base = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(4, 7) * u)
    elif kind == 1:
        base = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 1.0)
        base = (base - base.min()) / (np.ptp(base) + 1e-6)
    elif kind == 2:
        base = (rng.random((size, size)) > 0.93).astype(np.float32)
        base = cv2.GaussianBlur(base, (0, 0), 0.8) * 3
    elif kind == 3:
        base = np.abs(np.sin(2 * np.pi * rng.uniform(1.5, 2.5) * u + 3 * np.sin(6 * yy))) ** 8
    else:
        base = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), size / 10)
        base = (base - base.min()) / (np.ptp(base) + 1e-6)
    return np.clip(base, 0, 1)


def make_image(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image of texture family ``kind`` with random tint and noise."""
    base = _texture(kind % len(TEXTURES), size, rng)
    tint = rng.uniform(0.3, 1.0, size=3)
    img = base[..., None] * tint * 200 + rng.normal(0, 12, (size, size, 3)) + 30
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root: str | Path, counts: dict[str, int] | list[int], *, size: int = 48,
                 seed: int = 0, ext: str = ".png") -> Path:
    """Write ``root/<class>/<n>.png``; ``counts`` per class (imbalance welcome)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    items = counts.items() if isinstance(counts, dict) else zip(TEXTURES, counts)
    for kind, (name, n) in enumerate(items):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            side = int(size * rng.uniform(0.8, 1.25))
            img = make_image(kind, side, rng)
            cv2.imwrite(str(root / name / f"{i:04d}{ext}"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return root
