"""Index and validate N synthetic image files, cold (empty cache) and warm (unchanged files).

Usage: python benchmarks/index_scale.py [--n 50000] [--classes 5] [--side 224] [--workers 4]
       [--root DIR] [--keep]

Writes N small JPEGs (``--side`` px, a pool of distinct encodings copied to N files, so writing
is fast and every file is a real image that must be decoded) into class folders, then times
``index_dataset`` + ``validate_images`` exactly as training calls them:

- cold: empty cache folder: list, stat and decode every file (threads);
- warm: same files, same cache folder: list and stat only; decodes are counted and must be 0.

The files are in the page cache when timed (just written), so "cold" is decode-bound, not
disk-bound: on a real disk it is slower and the ratio larger. Ends with ``name value`` lines.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rockcls.data import images as data
from rockcls.data import index as data_index
from rockcls.data import sources as data_sources
from rockcls.data.synthetic import make_image  # noqa: E402


def write_files(root: Path, *, n: int, classes: int, side: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pool = []
    for k in range(64):
        img = cv2.cvtColor(make_image(k % 5, side, rng), cv2.COLOR_RGB2BGR)
        pool.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"class_{i % classes}" / f"{i:07d}.jpg").write_bytes(pool[i % len(pool)])


class DecodeCounter:
    """Counts calls of ``rockcls.data.images.load_image`` (every decode goes through it)."""

    def __init__(self) -> None:
        self.calls = 0
        self.original = data.load_image

    def __call__(self, path: str) -> np.ndarray:
        self.calls += 1
        return self.original(path)


def index_and_validate(root: Path, cache_dir: Path, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    index = data_index.index_dataset(root)
    valid = data_sources.validate_images(index, skip_bad=False, cache_dir=cache_dir, workers=workers)
    return time.perf_counter() - start, len(valid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="number of image files")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--side", type=int, default=224, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=4, help="decoding threads")
    parser.add_argument("--root", default="", help="folder for the files (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n < 2 * args.classes or args.classes < 2:
        parser.error("need --classes >= 2 and --n >= 2 * classes")
    work = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="rockcls-index-scale-"))
    root, cache_dir = work / "train", work / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    try:
        t = time.perf_counter()
        if not root.is_dir():
            write_files(root, n=args.n, classes=args.classes, side=args.side, seed=args.seed)
        print(f"{args.n} files of {args.side} px in {root} (written in {time.perf_counter() - t:.1f} s)")
        counter = DecodeCounter()
        data.load_image = counter
        cold_s, kept = index_and_validate(root, cache_dir, args.workers)
        cold_decodes, counter.calls = counter.calls, 0
        warm_s, _ = index_and_validate(root, cache_dir, args.workers)
        warm_decodes = counter.calls
    finally:
        data.load_image = getattr(data.load_image, "original", data.load_image)
        if not args.keep:
            shutil.rmtree(work if not args.root else cache_dir, ignore_errors=True)
    print(f"{'pass':<6} {'seconds':>8} {'files/s':>10} {'decodes':>8}")
    print(f"{'cold':<6} {cold_s:>8.2f} {kept / cold_s:>10.0f} {cold_decodes:>8d}")
    print(f"{'warm':<6} {warm_s:>8.2f} {kept / warm_s:>10.0f} {warm_decodes:>8d}")
    print()
    print(f"files {kept}")
    print(f"cold_s {cold_s:.3f}")
    print(f"warm_s {warm_s:.3f}")
    print(f"warm_decodes {warm_decodes}")
    print(f"speedup {cold_s / warm_s:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
