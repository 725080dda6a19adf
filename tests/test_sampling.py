"""Tests for rockcls.training.sampling: hard-negative memory and the mixture batch sampler."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from rockcls.training.memory import HardNegativeMemory
from rockcls.training.sampling import MixtureBatchSampler


def _effective_batches(sampler: MixtureBatchSampler) -> list[list[int]]:
    """Regroup micro-batches into effective batches."""
    micro = list(sampler)
    steps = sampler.accumulation_steps
    return [sum(micro[i : i + steps], []) for i in range(0, len(micro), steps)]


def _filled_memory(num_samples: int, ids: list[int], capacity: int = 64) -> HardNegativeMemory:
    memory = HardNegativeMemory(capacity=capacity, num_samples=num_samples)
    memory.update(ids, np.ones(len(ids)), np.ones(len(ids), dtype=bool))
    return memory


# ---- MixtureBatchSampler -------------------------------------------------------------


def test_length_counts_micro_batches() -> None:
    sampler = MixtureBatchSampler(np.zeros(100, dtype=int), batch_size=8, accumulation_steps=3)
    assert sampler.effective_batch_size == 24
    assert sampler.steps_per_epoch == 100 // 24
    assert len(sampler) == (100 // 24) * 3
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert all(len(b) == 8 for b in batches)


def test_explicit_steps_and_tiny_dataset() -> None:
    labels = np.arange(5)
    assert MixtureBatchSampler(labels, batch_size=16).steps_per_epoch == 1
    sampler = MixtureBatchSampler(labels, batch_size=4, accumulation_steps=2, steps_per_epoch=7)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 14
    assert all(0 <= i < 5 for b in batches for i in b)


def test_same_seed_and_epoch_is_deterministic() -> None:
    labels = np.arange(200) % 4
    a, b = (MixtureBatchSampler(labels, batch_size=10, balanced_ratio=0.5, seed=3) for _ in range(2))
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    assert list(a) == list(a), "re-iterating one epoch must repeat it"


def test_epochs_and_seeds_differ() -> None:
    labels = np.arange(200) % 4
    sampler = MixtureBatchSampler(labels, batch_size=10, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    other = MixtureBatchSampler(labels, batch_size=10, seed=4)
    assert list(other) != first


def test_plain_shuffle_has_no_repeats_within_epoch() -> None:
    labels = np.arange(103) % 3
    sampler = MixtureBatchSampler(labels, batch_size=10, accumulation_steps=2)
    flat = [i for b in sampler for i in b]
    assert len(flat) == 100
    assert len(set(flat)) == len(flat)
    assert set(flat) <= set(range(103))
    assert flat != sorted(flat)


def test_balanced_batches_equalise_imbalanced_classes() -> None:
    labels = np.array([0] * 90 + [1] * 9 + [2])
    sampler = MixtureBatchSampler(
        labels, batch_size=4, accumulation_steps=3, balanced_ratio=1.0, steps_per_epoch=20
    )
    assert (sampler.n_hard, sampler.n_balanced, sampler.n_uniform) == (0, 12, 0)
    for batch in _effective_batches(sampler):
        counts = np.bincount(labels[batch], minlength=3)
        assert counts.tolist() == [4, 4, 4]


def test_balanced_remainder_is_spread() -> None:
    labels = np.array([0] * 90 + [1] * 9 + [2])
    sampler = MixtureBatchSampler(labels, batch_size=7, balanced_ratio=1.0, steps_per_epoch=30)
    for batch in _effective_batches(sampler):
        counts = np.bincount(labels[batch], minlength=3)
        assert counts.max() - counts.min() <= 1


def test_mixture_counts() -> None:
    memory = HardNegativeMemory(capacity=10, num_samples=100)
    sampler = MixtureBatchSampler(
        np.arange(100) % 2, batch_size=10, accumulation_steps=2,
        hn_ratio=0.25, balanced_ratio=0.5, memory=memory,
    )
    assert sampler.n_hard == 5
    assert sampler.n_balanced == round(0.5 * 15)
    assert sampler.n_hard + sampler.n_balanced + sampler.n_uniform == 20


def test_hard_share_comes_from_memory() -> None:
    labels = np.arange(1000) % 5
    hard_ids = [3, 77, 512, 999]
    memory = _filled_memory(1000, hard_ids)
    sampler = MixtureBatchSampler(
        labels, batch_size=8, accumulation_steps=2, hn_ratio=0.5, memory=memory, steps_per_epoch=25
    )
    assert sampler.n_hard == 8
    for batch in _effective_batches(sampler):
        members = sum(i in hard_ids for i in batch)
        assert members >= sampler.n_hard


def test_empty_memory_falls_back_to_balanced_and_uniform() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    memory = HardNegativeMemory(capacity=16, num_samples=100)
    sampler = MixtureBatchSampler(
        labels, batch_size=10, hn_ratio=0.5, balanced_ratio=1.0, memory=memory, steps_per_epoch=5
    )
    for batch in _effective_batches(sampler):
        assert len(batch) == 10
        assert np.bincount(labels[batch], minlength=2).tolist() == [5, 5]


def test_memory_is_consulted_lazily() -> None:
    labels = np.arange(100) % 2
    memory = HardNegativeMemory(capacity=4, num_samples=100)
    sampler = MixtureBatchSampler(
        labels, batch_size=10, hn_ratio=1.0, memory=memory, steps_per_epoch=3
    )
    it = iter(sampler)
    first = next(it)
    assert len(first) == 10
    memory.update([42], [2.0], [True])
    assert next(it) == [42] * 10


def test_works_with_dataloader() -> None:
    dataset = torch.utils.data.TensorDataset(torch.arange(50))
    sampler = MixtureBatchSampler(np.arange(50) % 2, batch_size=5, accumulation_steps=2)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    batches = [b[0].tolist() for b in loader]
    assert len(batches) == len(sampler) == 10
    assert sorted(i for b in batches for i in b) == list(range(50))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be"),
        ({"batch_size": 4, "accumulation_steps": 0}, "accumulation_steps must be"),
        ({"batch_size": 4, "hn_ratio": 1.5}, r"hn_ratio must be in \[0, 1\], got 1.5"),
        ({"batch_size": 4, "hn_ratio": -0.1}, "hn_ratio must be in"),
        ({"batch_size": 4, "balanced_ratio": 2.0}, "balanced_ratio must be in"),
        ({"batch_size": 4, "hn_ratio": 0.5}, "memory is required"),
        ({"batch_size": 4, "steps_per_epoch": 0}, "steps_per_epoch must be"),
        ({"batch_size": 4, "seed": -1}, "seed must be"),
        (
            {"batch_size": 4, "memory": HardNegativeMemory(capacity=2, num_samples=7)},
            "memory.num_samples must equal",
        ),
    ],
)
def test_sampler_rejects_bad_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MixtureBatchSampler(np.arange(10) % 2, **kwargs)


@pytest.mark.parametrize("labels", [np.array([], dtype=int), np.zeros((3, 2), dtype=int), np.ones(4) * 0.5])
def test_sampler_rejects_bad_labels(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="labels must be a non-empty 1-D integer array"):
        MixtureBatchSampler(labels, batch_size=2)


def test_set_epoch_rejects_negative() -> None:
    sampler = MixtureBatchSampler(np.arange(10), batch_size=2)
    with pytest.raises(ValueError, match="epoch must be"):
        sampler.set_epoch(-1)


# ---- HardNegativeMemory --------------------------------------------------------------


def test_capacity_respected_and_keeps_highest_loss() -> None:
    memory = HardNegativeMemory(capacity=5, num_samples=100)
    rng = np.random.default_rng(0)
    losses = rng.permutation(np.arange(1, 41, dtype=float))
    for start in range(0, 40, 8):
        ids = np.arange(start, start + 8)
        memory.update(ids, losses[ids], np.ones(8, dtype=bool))
        assert len(memory) <= 5
    # 5 updates with half_life 1000 barely decay; the top-5 losses must survive.
    expected = set(np.argsort(losses)[-5:].tolist())
    assert set(memory.ids().tolist()) == expected
    assert sorted(memory.losses().tolist()) == [36.0, 37.0, 38.0, 39.0, 40.0]


def test_zero_capacity_stays_empty() -> None:
    memory = HardNegativeMemory(capacity=0, num_samples=10)
    memory.update([1, 2], [3.0, 4.0], [True, True])
    assert len(memory) == 0
    assert memory.sample(5, np.random.default_rng(0)).size == 0


def test_correct_samples_are_removed() -> None:
    memory = HardNegativeMemory(capacity=10, num_samples=20)
    memory.update([1, 2, 3], [1.0, 2.0, 3.0], [True, True, True])
    memory.update([2, 3, 4], [0.1, 0.1, 0.1], [False, False, False])
    assert memory.ids().tolist() == [1]
    assert 2 not in memory and 1 in memory


def test_refresh_updates_loss_without_duplicating() -> None:
    memory = HardNegativeMemory(capacity=10, num_samples=20)
    memory.update([5, 6], [1.0, 2.0], [True, True])
    memory.update([5], [9.0], [True])
    assert len(memory) == 2
    assert dict(zip(memory.ids().tolist(), memory.losses().tolist())) == {5: 9.0, 6: 2.0}


def test_refreshed_entry_outranks_stale_one() -> None:
    memory = HardNegativeMemory(capacity=2, num_samples=20, half_life=1.0)
    memory.update([1, 2], [4.0, 4.0], [True, True])
    for _ in range(5):
        memory.update([1], [4.0], [True])
    memory.update([3], [1.0], [True])  # id 2 is 6 half-lives old: 4/64 < 1
    assert sorted(memory.ids().tolist()) == [1, 3]


def test_update_accepts_tensors() -> None:
    memory = HardNegativeMemory(capacity=4, num_samples=10)
    memory.update(torch.tensor([1, 2]), torch.tensor([0.5, 1.5]), torch.tensor([True, False]))
    assert memory.ids().tolist() == [1]


def test_duplicates_last_occurrence_wins() -> None:
    memory = HardNegativeMemory(capacity=10, num_samples=20)
    memory.update([7, 7, 8, 8], [1.0, 5.0, 2.0, 2.0], [True, True, True, False])
    assert memory.ids().tolist() == [7]
    assert memory.losses().tolist() == [5.0]


def test_recency_evicts_old_high_loss_entry() -> None:
    memory = HardNegativeMemory(capacity=1, num_samples=10, half_life=10.0)
    memory.update([0], [100.0], [True])
    memory.update([1], [50.0], [True])
    assert memory.ids().tolist() == [0], "a slightly older but higher loss must win"
    for _ in range(100):  # 10 half-lives: 100 decays to ~0.1
        memory.update([], [], [])
    memory.update([1], [1.0], [True])
    assert memory.ids().tolist() == [1]


def test_non_finite_losses_are_ignored() -> None:
    memory = HardNegativeMemory(capacity=10, num_samples=10)
    memory.update([1, 2, 3, 4], [np.nan, np.inf, -np.inf, 2.0], [True] * 4)
    assert memory.ids().tolist() == [4]
    memory.update([4], [np.nan], [False])
    assert memory.ids().tolist() == [4]


def test_sample_is_proportional_to_loss() -> None:
    memory = HardNegativeMemory(capacity=10, num_samples=10)
    memory.update([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0], [True] * 4)
    draws = memory.sample(40_000, np.random.default_rng(1))
    assert draws.dtype == np.int64
    freq = np.bincount(draws, minlength=4)[:4] / draws.size
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.015)


def test_sample_edge_cases() -> None:
    rng = np.random.default_rng(0)
    memory = HardNegativeMemory(capacity=4, num_samples=10)
    assert memory.sample(3, rng).dtype == np.int64 and memory.sample(3, rng).size == 0
    memory.update([2, 3], [0.0, 0.0], [True, True])
    assert memory.sample(0, rng).size == 0
    assert set(memory.sample(50, rng).tolist()) == {2, 3}, "all-zero losses sample uniformly"
    with pytest.raises(ValueError, match="k must be"):
        memory.sample(-1, rng)


def test_random_updates_match_top_k_reference() -> None:
    memory = HardNegativeMemory(capacity=3, num_samples=8, half_life=1e9)
    rng = np.random.default_rng(0)
    reference: dict[int, float] = {}
    for _ in range(2000):
        ids = rng.integers(0, 8, size=4)
        losses = rng.uniform(0.1, 10.0, size=4)
        wrong = rng.random(4) < 0.8
        memory.update(ids, losses, wrong)
        latest = {int(i): (float(l), bool(w)) for i, l, w in zip(ids, losses, wrong)}
        for i, (l, w) in latest.items():
            reference.pop(i, None)
            if w:
                reference[i] = l
        top = sorted(reference.items(), key=lambda kv: kv[1], reverse=True)[:3]
        reference = dict(top)
    assert dict(zip(memory.ids().tolist(), memory.losses().tolist())) == reference


def test_heap_rebuild_keeps_semantics(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = HardNegativeMemory(capacity=2, num_samples=10, half_life=1e9)
    rebuild = memory._rebuild_heap
    calls = []
    monkeypatch.setattr(memory, "_rebuild_heap", lambda: (calls.append(1), rebuild()))
    memory.update([0, 1], [1.0, 100.0], [True, True])
    # Stale entries for id 1 sit above id 0's live entry, so only a rebuild drops them.
    for step in range(3000):
        memory.update([1], [100.0 + step], [True])
    assert len(calls) >= 2
    memory.update([2], [50.0], [True])
    assert sorted(memory.ids().tolist()) == [1, 2]
    memory.update([3], [10.0], [True])
    assert sorted(memory.ids().tolist()) == [1, 2]


def test_state_dict_round_trip_weights_only() -> None:
    memory = HardNegativeMemory(capacity=8, num_samples=100, half_life=5.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        memory.update(rng.integers(0, 100, 6), rng.uniform(0.1, 5, 6), rng.random(6) < 0.7)
    buffer = io.BytesIO()
    torch.save(memory.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = HardNegativeMemory(capacity=8, num_samples=100, half_life=5.0)
    restored.load_state_dict(state)
    assert sorted(restored.ids().tolist()) == sorted(memory.ids().tolist())
    assert restored.sample(20, np.random.default_rng(3)).tolist() == memory.sample(
        20, np.random.default_rng(3)
    ).tolist()
    # Both must evolve identically after the restore.
    for mem in (memory, restored):
        mem.update([1, 2, 3], [0.5, 6.0, 0.2], [True, True, False])
    assert dict(zip(restored.ids().tolist(), restored.losses().tolist())) == dict(
        zip(memory.ids().tolist(), memory.losses().tolist())
    )


def test_load_state_dict_into_smaller_capacity_keeps_top() -> None:
    memory = HardNegativeMemory(capacity=5, num_samples=10)
    memory.update(range(5), [1.0, 5.0, 2.0, 4.0, 3.0], [True] * 5)
    small = HardNegativeMemory(capacity=2, num_samples=10)
    small.load_state_dict(memory.state_dict())
    assert sorted(small.ids().tolist()) == [1, 3]


def test_load_state_dict_rejects_other_dataset_size() -> None:
    state = HardNegativeMemory(capacity=2, num_samples=10).state_dict()
    with pytest.raises(ValueError, match="num_samples must be 20"):
        HardNegativeMemory(capacity=2, num_samples=20).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capacity": -1, "num_samples": 10}, "capacity must be an integer >= 0, got -1"),
        ({"capacity": 2, "num_samples": 0}, "num_samples must be an integer >= 1, got 0"),
        ({"capacity": 2, "num_samples": 10, "half_life": 0.0}, "half_life must be"),
        ({"capacity": 2, "num_samples": 10, "half_life": float("inf")}, "half_life must be"),
    ],
)
def test_memory_rejects_bad_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HardNegativeMemory(**kwargs)


def test_update_rejects_bad_arrays() -> None:
    memory = HardNegativeMemory(capacity=2, num_samples=10)
    with pytest.raises(ValueError, match="equal length"):
        memory.update([1, 2], [1.0], [True, True])
    with pytest.raises(ValueError, match=r"indices must be in \[0, 10\)"):
        memory.update([10], [1.0], [True])
