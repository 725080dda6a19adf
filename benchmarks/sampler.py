"""Benchmark HardNegativeMemory against a dict-and-sort reference.

Usage: python benchmarks/sampler.py [--batch 64] [--repeats 200]

For memory sizes 1k/10k/100k (pre-filled to capacity, num_samples = 10x
capacity) it reports the mean milliseconds per ``update`` of one batch and per
``sample(13)``, then machine-readable ``key value`` lines.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rockcls.training.memory import HardNegativeMemory  # noqa: E402

SIZES = (1_000, 10_000, 100_000)
SAMPLE_K = 13
Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


class ReferenceMemory:
    """The contest seed's approach: dict of id -> loss, full sort after every update."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.loss: dict[int, float] = {}

    def update(self, indices: np.ndarray, losses: np.ndarray, wrong: np.ndarray) -> None:
        for i, loss, is_wrong in zip(indices.tolist(), losses.tolist(), wrong.tolist()):
            if is_wrong:
                self.loss[i] = loss
            else:
                self.loss.pop(i, None)
        ranked = sorted(self.loss.items(), key=lambda kv: kv[1], reverse=True)
        self.loss = dict(ranked[: self.capacity])

    def sample(self, k: int, rng: np.random.Generator) -> np.ndarray:
        ids = np.fromiter(self.loss.keys(), dtype=np.int64, count=len(self.loss))
        weights = np.fromiter(self.loss.values(), dtype=np.float64, count=len(self.loss))
        return rng.choice(ids, size=k, p=weights / weights.sum())


def make_batches(*, count: int, batch: int, num_samples: int, rng: np.random.Generator) -> list[Batch]:
    """Random ids, exponential losses and ~50% misclassified, generated before timing."""
    return [
        (
            rng.integers(0, num_samples, size=batch),
            rng.exponential(1.0, size=batch),
            rng.random(batch) < 0.5,
        )
        for _ in range(count)
    ]


def prefill(
    *, capacity: int, num_samples: int, rng: np.random.Generator
) -> tuple[HardNegativeMemory, ReferenceMemory]:
    """Both memories hold the same `capacity` misclassified samples."""
    ids = rng.permutation(num_samples)[:capacity]
    losses = rng.exponential(1.0, size=capacity)
    memory = HardNegativeMemory(capacity=capacity, num_samples=num_samples)
    for start in range(0, capacity, 1024):
        chunk = slice(start, start + 1024)
        memory.update(ids[chunk], losses[chunk], np.ones(ids[chunk].size, dtype=bool))
    reference = ReferenceMemory(capacity)
    reference.loss = dict(zip(ids.tolist(), losses.tolist()))
    assert len(memory) == len(reference.loss) == capacity
    return memory, reference


def mean_ms(fn: Callable[[int], object], repeats: int) -> float:
    fn(0)  # warm-up: first calls pay for allocation and caches
    start = time.perf_counter()
    for r in range(repeats):
        fn(r)
    return (time.perf_counter() - start) * 1000.0 / repeats


def bench_size(*, capacity: int, batch: int, repeats: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    num_samples = 10 * capacity
    memory, reference = prefill(capacity=capacity, num_samples=num_samples, rng=rng)
    batches = make_batches(count=repeats, batch=batch, num_samples=num_samples, rng=rng)
    sample_rng = np.random.default_rng(seed + 1)
    return {
        "ref_update": mean_ms(lambda r: reference.update(*batches[r]), repeats),
        "update": mean_ms(lambda r: memory.update(*batches[r]), repeats),
        "ref_sample": mean_ms(lambda r: reference.sample(SAMPLE_K, sample_rng), repeats),
        "sample": mean_ms(lambda r: memory.sample(SAMPLE_K, sample_rng), repeats),
    }


def print_report(results: dict[int, dict[str, float]]) -> None:
    header = ("size", "ref update ms", "rockcls update ms", "speedup", "ref sample ms", "rockcls sample ms")
    print("  ".join(f"{h:>17}" for h in header))
    for size, res in results.items():
        row = (
            f"{size:>17d}",
            f"{res['ref_update']:>17.4f}",
            f"{res['update']:>17.4f}",
            f"{res['ref_update'] / res['update']:>16.1f}x",
            f"{res['ref_sample']:>17.4f}",
            f"{res['sample']:>17.4f}",
        )
        print("  ".join(row))
    print()
    for size, res in results.items():
        print(f"update_ms_{size // 1000}k {res['update']:.4f}")
    print(f"sample_ms_100k {results[100_000]['sample']:.4f}")
    print(f"reference_update_ms_100k {results[100_000]['ref_update']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="samples per update call")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per measurement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.batch < 1:
        raise ValueError(f"batch must be >= 1, got {args.batch}")
    if args.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {args.repeats}")
    results = {
        size: bench_size(capacity=size, batch=args.batch, repeats=args.repeats, seed=args.seed)
        for size in SIZES
    }
    print_report(results)


if __name__ == "__main__":
    main()
