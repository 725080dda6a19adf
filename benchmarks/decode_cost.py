"""Per-image cost of `rockcls.data.images.load_image` on typical files (one thread, warm page cache).

    PYTHONPATH=. python benchmarks/decode_cost.py [--repeat 300]

Writes a few synthetic images (small PNGs as in the tests, photo-sized JPEGs as in the contest
data) to a temporary folder and prints the fastest and the median microseconds per ``load_image``
call for each (the fastest is the steadier figure on a busy machine), and the part of it spent
reading the header before decoding. Run it against two checkouts to compare decoding paths.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from rockcls.data.images import load_image
from rockcls.data.synthetic import make_image

CASES = [("png", 48), ("png", 512), ("jpg", 384), ("jpg", 1024), ("jpg", 3000)]


def write_case(folder: Path, ext: str, side: int, rng: np.random.Generator) -> Path:
    img = cv2.resize(make_image(1, 256, rng), (side * 4 // 3, side))
    path = folder / f"{side}.{ext}"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return path


def timings_us(fn, repeat: int) -> tuple[float, float]:
    fn()  # page cache and lazy library set-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e6, statistics.median(times) * 1e6


def header_us(path: Path, repeat: int) -> float:
    """The header check alone (absent in checkouts without it: NaN)."""
    from rockcls.data import images as data

    if not hasattr(data, "_header_size"):
        return float("nan")
    payload = path.read_bytes()
    return timings_us(lambda: data._header_size(payload, data.DEFAULT_MAX_PIXELS), repeat)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=300, help="timed calls per file")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="rockcls-decode-") as tmp:
        print(f"{'file':<16} {'bytes':>9} {'min_us':>9} {'median_us':>10} {'header_us':>10}")
        for ext, side in CASES:
            path = write_case(Path(tmp), ext, side, rng)
            repeat = max(5, args.repeat // max(1, side // 512))
            best, median = timings_us(lambda: load_image(str(path)), repeat)
            size = f"{side * 4 // 3}x{side}.{ext}"
            print(f"{size:<16} {path.stat().st_size:>9} {best:>9.0f} {median:>10.0f} {header_us(path, repeat):>10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
