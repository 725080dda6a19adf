"""The hard-negative memory: the training images the model got wrong or found hardest lately,
ranked by loss with a decay over steps, sampled from in proportion to their loss."""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

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
