"""Batch composition for training: hard-negative memory and mixture batch sampler."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

_LN2 = math.log(2.0)


def _flat(values: Any, dtype: type) -> np.ndarray:
    """1-D numpy copy of a sequence, array or (possibly CUDA) tensor."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype).reshape(-1)


class HardNegativeMemory:
    """Bounded memory of recent high-loss misclassified samples.

    Eviction priority is ``loss * 0.5 ** (age / half_life)`` with age counted
    in ``update`` calls. It is stored as the time-invariant key
    ``log(loss) + t_seen * ln2 / half_life``: ordering by key equals ordering
    by decayed loss at any common "now", so stored keys never need rescaling.
    """

    def __init__(self, capacity: int, num_samples: int, half_life: float = 1000.0) -> None:
        if int(capacity) != capacity or capacity < 0:
            raise ValueError(f"capacity must be an integer >= 0, got {capacity}")
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples}")
        if not (math.isfinite(half_life) and half_life > 0):
            raise ValueError(f"half_life must be a finite number > 0, got {half_life}")
        self.capacity = int(capacity)
        self.num_samples = int(num_samples)
        self.half_life = float(half_life)
        self._rate = _LN2 / self.half_life
        self._reset()

    def _reset(self) -> None:
        self._t = 0
        self._n = 0
        self._ids = np.zeros(self.capacity, dtype=np.int64)
        self._loss = np.zeros(self.capacity, dtype=np.float64)
        self._key = np.zeros(self.capacity, dtype=np.float64)
        self._seen = np.zeros(self.capacity, dtype=np.int64)
        self._slot = np.full(self.num_samples, -1, dtype=np.int64)
        # Bumped on every push so stale heap entries for an id can be recognised.
        self._version = np.zeros(self.num_samples, dtype=np.int64)
        self._heap: list[tuple[float, int, int]] = []

    def __len__(self) -> int:
        return self._n

    def __contains__(self, sample_id: object) -> bool:
        if not isinstance(sample_id, (int, np.integer)) or not 0 <= sample_id < self.num_samples:
            return False
        return bool(self._slot[sample_id] >= 0)

    def ids(self) -> np.ndarray:
        """Live sample ids (a copy), aligned with ``losses()``."""
        return self._ids[: self._n].copy()

    def losses(self) -> np.ndarray:
        """Losses of the live entries (a copy), aligned with ``ids()``."""
        return self._loss[: self._n].copy()

    def _make_key(self, loss: float, t_seen: int) -> float:
        log_loss = math.log(loss) if loss > 0 else -math.inf
        return log_loss + t_seen * self._rate

    def _push(self, sample_id: int, key: float) -> None:
        version = int(self._version[sample_id]) + 1
        self._version[sample_id] = version
        heapq.heappush(self._heap, (key, version, sample_id))
        if len(self._heap) > 4 * self.capacity + 1024:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        # O(capacity), but only after >= 3*capacity+1024 pushes: amortised O(1).
        n = self._n
        ids = self._ids[:n].tolist()
        self._heap = list(zip(self._key[:n].tolist(), self._version[ids].tolist(), ids))
        heapq.heapify(self._heap)

    def _peek_min(self) -> tuple[float, int]:
        """(key, id) of the lowest-priority live entry; memory must be non-empty."""
        heap = self._heap
        while True:
            key, version, sample_id = heap[0]
            if self._slot[sample_id] >= 0 and self._version[sample_id] == version:
                return key, sample_id
            heapq.heappop(heap)

    def _set(self, slot: int, sample_id: int, loss: float, key: float) -> None:
        self._ids[slot] = sample_id
        self._loss[slot] = loss
        self._key[slot] = key
        self._seen[slot] = self._t
        self._slot[sample_id] = slot

    def _remove(self, sample_id: int) -> None:
        """Swap-remove so live entries stay dense in ``[:n]``."""
        slot = int(self._slot[sample_id])
        last = self._n - 1
        if slot != last:
            moved = int(self._ids[last])
            self._ids[slot] = moved
            self._loss[slot] = self._loss[last]
            self._key[slot] = self._key[last]
            self._seen[slot] = self._seen[last]
            self._slot[moved] = slot
        self._slot[sample_id] = -1
        self._n = last

    def _insert(self, sample_id: int, loss: float) -> None:
        key = self._make_key(loss, self._t)
        if self._n == self.capacity:
            min_key, min_id = self._peek_min()
            if key <= min_key:
                return
            self._remove(min_id)
        self._set(self._n, sample_id, loss, key)
        self._n += 1
        self._push(sample_id, key)

    def _refresh(self, sample_id: int, loss: float) -> None:
        key = self._make_key(loss, self._t)
        self._set(int(self._slot[sample_id]), sample_id, loss, key)
        self._push(sample_id, key)

    def _dedupe(self, indices: Any, losses: Any, wrong: Any) -> dict[int, tuple[float, bool]]:
        """Map id -> (loss, wrong); last occurrence wins, non-finite/negative dropped."""
        ids = _flat(indices, np.int64)
        loss = _flat(losses, np.float64)
        bad = _flat(wrong, np.bool_)
        if not ids.size == loss.size == bad.size:
            sizes = f"{ids.size}, {loss.size}, {bad.size}"
            raise ValueError(f"indices, losses and wrong must have equal length, got {sizes}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise ValueError(
                f"indices must be in [0, {self.num_samples}), got range [{ids.min()}, {ids.max()}]"
            )
        # A negative loss has no meaningful priority or sampling weight; treat like NaN.
        keep = np.isfinite(loss) & (loss >= 0)
        return dict(zip(ids[keep].tolist(), zip(loss[keep].tolist(), bad[keep].tolist())))

    def update(self, indices: Any, losses: Any, wrong: Any) -> None:
        """Fold in one optimizer step's per-sample results; O(batch) amortised."""
        self._t += 1
        latest = self._dedupe(indices, losses, wrong)
        fresh: list[tuple[int, float]] = []
        # Removals first so the room they free is available to this batch's inserts.
        for sample_id, (loss, is_wrong) in latest.items():
            in_memory = self._slot[sample_id] >= 0
            if not is_wrong:
                if in_memory:
                    self._remove(sample_id)
            elif in_memory:
                self._refresh(sample_id, loss)
            else:
                fresh.append((sample_id, loss))
        if self.capacity == 0:
            return
        for sample_id, loss in fresh:
            self._insert(sample_id, loss)

    def sample(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``k`` ids with replacement, proportional to loss.

        Costs O(len(self)) for the cumulative sum; it runs once per effective
        batch, so it is not worth maintaining a Fenwick tree.
        """
        if int(k) != k or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k}")
        if self._n == 0 or k == 0:
            return np.empty(0, dtype=np.int64)
        cum = np.cumsum(self._loss[: self._n])
        total = float(cum[-1])
        if not (math.isfinite(total) and total > 0):
            # All-zero (or overflowing) weights carry no ranking; fall back to uniform.
            return self._ids[rng.integers(0, self._n, size=int(k))].copy()
        picks = np.searchsorted(cum, rng.random(int(k)) * total, side="right")
        return self._ids[np.minimum(picks, self._n - 1)].copy()

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: only ints, floats and tensors (``weights_only``-safe)."""
        n = self._n
        return {
            "capacity": self.capacity,
            "num_samples": self.num_samples,
            "half_life": self.half_life,
            "t": self._t,
            "ids": torch.from_numpy(self._ids[:n].copy()),
            "losses": torch.from_numpy(self._loss[:n].copy()),
            "seen": torch.from_numpy(self._seen[:n].copy()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore contents; keys are recomputed with this instance's half_life."""
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"num_samples must be {self.num_samples}, got {state['num_samples']} in state"
            )
        ids = np.asarray(state["ids"], dtype=np.int64).reshape(-1)
        loss = np.asarray(state["losses"], dtype=np.float64).reshape(-1)
        seen = np.asarray(state["seen"], dtype=np.int64).reshape(-1)
        if not ids.size == loss.size == seen.size:
            sizes = f"{ids.size}, {loss.size}, {seen.size}"
            raise ValueError(f"state ids, losses and seen must have equal length, got {sizes}")
        self._reset()
        self._t = int(state["t"])
        keys = [self._make_key(l, s) for l, s in zip(loss.tolist(), seen.tolist())]
        # A smaller capacity keeps the highest-priority entries; slot order is kept
        # so that sampling after a restore matches sampling before it.
        top = sorted(range(ids.size), key=keys.__getitem__, reverse=True)[: self.capacity]
        for slot, i in enumerate(sorted(top)):
            self._ids[slot], self._loss[slot], self._key[slot] = ids[i], loss[i], keys[i]
            self._seen[slot] = seen[i]
            self._slot[ids[i]] = slot
        self._n = len(top)
        self._rebuild_heap()


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
        default_steps = max(1, self._labels.size // self.effective_batch_size)
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
        return self.batch_size * self.accumulation_steps * self.num_replicas

    @property
    def n_hard(self) -> int:
        """Hard-negative draws per effective batch while the memory is non-empty."""
        return round(self.hn_ratio * self.effective_batch_size)

    @property
    def n_balanced(self) -> int:
        return round(self.balanced_ratio * (self.effective_batch_size - self.n_hard))

    @property
    def n_uniform(self) -> int:
        return self.effective_batch_size - self.n_hard - self.n_balanced

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
