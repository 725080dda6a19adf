"""Batch composition for training: the batch arithmetic (BatchComposition) and the mixture
batch sampler that draws hard negatives (from `rockcls.training.memory`), class-balanced and
uniform positions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from rockcls.training.memory import HardNegativeMemory


class _Cycler:
    """Walks a random permutation of ``pool``, reshuffling whenever it runs out."""

    def __init__(self, pool: np.ndarray) -> None:
        self._pool = pool
        self._perm = pool
        self._pos = pool.size  # start exhausted so the first take shuffles

    def take(self, count: int, rng: np.random.Generator) -> np.ndarray:
        chunks = []
        while count > 0:
            if self._pos == self._pool.size:
                self._perm = rng.permutation(self._pool)
                self._pos = 0
            step = min(count, self._pool.size - self._pos)
            chunks.append(self._perm[self._pos : self._pos + step])
            self._pos += step
            count -= step
        return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)


def _validate_labels(labels: Any) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"labels must be a non-empty 1-D integer array, got shape {arr.shape} dtype {arr.dtype}"
        )
    return arr


def _class_pools(labels: np.ndarray) -> list[np.ndarray]:
    """Positions of each distinct label, in label order."""
    _, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable").astype(np.int64)
    splits = np.flatnonzero(np.diff(inverse[order])) + 1
    return np.split(order, splits)


def _check_ratio(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _check_count(name: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return int(value)


@dataclass(frozen=True)
class BatchComposition:
    """What one optimizer step draws: the one place where the batch arithmetic is done. The train
    run logs it (`report`), the sampler draws by it, the memory's half-life is its epoch."""

    batch_size: int
    accumulation_steps: int = 1
    num_replicas: int = 1
    hn_ratio: float = 0.0
    balanced_ratio: float = 0.0

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.accumulation_steps * self.num_replicas

    @property
    def n_hard(self) -> int:
        return round(self.hn_ratio * self.effective_batch_size)

    @property
    def n_balanced(self) -> int:
        return round(self.balanced_ratio * (self.effective_batch_size - self.n_hard))

    @property
    def n_uniform(self) -> int:
        return self.effective_batch_size - self.n_hard - self.n_balanced

    def steps_per_epoch(self, num_samples: int) -> int:
        """Optimizer steps of one epoch over ``num_samples`` training images (at least one)."""
        return max(1, num_samples // self.effective_batch_size)

    def report(self, num_samples: int) -> dict[str, int]:
        """The figures a train run logs as parameters."""
        return {"effective_batch_size": self.effective_batch_size, "hard_negatives_per_step": self.n_hard,
                "balanced_per_step": self.n_balanced, "steps_per_epoch": self.steps_per_epoch(num_samples)}


class MixtureBatchSampler(Sampler[list[int]]):
    """Micro-batch sampler mixing hard negatives, class-balanced and uniform draws.

    Each effective batch (``batch_size * accumulation_steps * num_replicas``
    positions) is drawn whole, shuffled, and cut into ``accumulation_steps``
    micro-steps; of each, rank ``rank`` takes its ``batch_size`` share. Every
    rank draws with the same seed from the same memory, so N ranks together
    see exactly the batches of one process with ``num_replicas=1`` and an N
    times larger ``batch_size``. Call ``set_epoch`` every epoch; iteration is
    a pure function of (seed, epoch, memory contents).
    """

    def __init__(
        self,
        labels: np.ndarray,
        *,
        batch_size: int,
        accumulation_steps: int = 1,
        hn_ratio: float = 0.0,
        balanced_ratio: float = 0.0,
        memory: HardNegativeMemory | None = None,
        seed: int = 0,
        steps_per_epoch: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__()
        self._labels = _validate_labels(labels)
        self.batch_size = _check_count("batch_size", batch_size)
        self.accumulation_steps = _check_count("accumulation_steps", accumulation_steps)
        self.num_replicas = _check_count("num_replicas", num_replicas)
        if int(rank) != rank or not 0 <= rank < self.num_replicas:
            raise ValueError(f"rank must be an integer in [0, {self.num_replicas}), got {rank}")
        self.rank = int(rank)
        self.hn_ratio = _check_ratio("hn_ratio", hn_ratio)
        self.balanced_ratio = _check_ratio("balanced_ratio", balanced_ratio)
        self._check_memory(memory)
        self.memory = memory
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed}")
        self.seed = int(seed)
        self.composition = BatchComposition(self.batch_size, self.accumulation_steps, self.num_replicas,
                                            self.hn_ratio, self.balanced_ratio)
        default_steps = self.composition.steps_per_epoch(self._labels.size)
        self.steps_per_epoch = (
            default_steps if steps_per_epoch is None else _check_count("steps_per_epoch", steps_per_epoch)
        )
        self.epoch = 0
        self._class_pools = _class_pools(self._labels)

    def _check_memory(self, memory: HardNegativeMemory | None) -> None:
        if self.hn_ratio > 0 and memory is None:
            raise ValueError(
                f"memory is required when hn_ratio > 0, got memory=None (hn_ratio={self.hn_ratio})"
            )
        if memory is not None and memory.num_samples != self._labels.size:
            raise ValueError(
                f"memory.num_samples must equal len(labels)={self._labels.size}, got {memory.num_samples}"
            )

    @property
    def effective_batch_size(self) -> int:
        """Positions per optimizer step, over all ranks."""
        return self.composition.effective_batch_size

    @property
    def n_hard(self) -> int:
        """Hard-negative draws per effective batch while the memory is non-empty."""
        return self.composition.n_hard

    @property
    def n_balanced(self) -> int:
        return self.composition.n_balanced

    @property
    def n_uniform(self) -> int:
        return self.composition.n_uniform

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accumulation_steps

    def __iter__(self) -> Iterator[list[int]]:
        # A fresh generator per pass keeps re-iteration of one epoch reproducible.
        rng = np.random.default_rng([self.seed, self.epoch])
        uniform = _Cycler(np.arange(self._labels.size, dtype=np.int64))
        per_class = [_Cycler(pool) for pool in self._class_pools]
        for _ in range(self.steps_per_epoch):
            # Drawn only when the loader asks for it, so the memory is at most a
            # few prefetched steps stale relative to the optimizer.
            batch = self._draw_effective(rng, uniform, per_class)
            mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            for micro in np.split(batch, self.accumulation_steps):
                yield micro[mine].tolist()

    def _draw_effective(
        self, rng: np.random.Generator, uniform: _Cycler, per_class: list[_Cycler]
    ) -> np.ndarray:
        n_hard = self.n_hard if self.memory is not None and len(self.memory) > 0 else 0
        hard = self.memory.sample(n_hard, rng) if n_hard else np.empty(0, dtype=np.int64)
        rest = self.effective_batch_size - n_hard
        n_bal = round(self.balanced_ratio * rest)
        balanced = self._draw_balanced(n_bal, rng, per_class)
        batch = np.concatenate([hard, balanced, uniform.take(rest - n_bal, rng)])
        rng.shuffle(batch)
        return batch

    def _draw_balanced(self, count: int, rng: np.random.Generator, per_class: list[_Cycler]) -> np.ndarray:
        """Equal shares per class; the remainder goes to randomly chosen classes."""
        if count == 0:
            return np.empty(0, dtype=np.int64)
        n_classes = len(per_class)
        shares = np.full(n_classes, count // n_classes, dtype=np.int64)
        shares[rng.choice(n_classes, size=count % n_classes, replace=False)] += 1
        return np.concatenate([cyc.take(int(c), rng) for cyc, c in zip(per_class, shares)])
