"""The tensor-side augmentations (rockcls.training.transforms) against numpy and albumentations."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from rockcls.training.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceAugment,
    DeviceAugmentSpec,
    build_device_augment,
    build_eval_transform,
    build_train_transform,
    dihedral,
    normalize,
)


@pytest.fixture
def hwc() -> np.ndarray:
    """A non-square RGB uint8 image with distinct pixels, so any permutation is visible."""
    return np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)


@pytest.fixture
def square() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)


def chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


def hwc_of(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


def run_augment(spec: DeviceAugmentSpec, batch: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    out = DeviceAugment(spec, seed=seed)(torch.stack([chw(b) for b in batch]))
    assert out.dtype == torch.float32
    return [hwc_of(o) for o in out]


def test_device_hflip_equals_numpy_and_albumentations_flip(hwc):
    (out,) = run_augment(DeviceAugmentSpec(hflip=1.0), [hwc])
    assert np.array_equal(out, np.flip(hwc, axis=1))
    assert np.array_equal(out, A.HorizontalFlip(p=1.0)(image=hwc)["image"])


def test_device_vflip_equals_numpy_and_albumentations_flip(hwc):
    (out,) = run_augment(DeviceAugmentSpec(vflip=1.0), [hwc])
    assert np.array_equal(out, np.flip(hwc, axis=0))
    assert np.array_equal(out, A.VerticalFlip(p=1.0)(image=hwc)["image"])


def test_no_augmentation_is_the_identity_in_float(hwc):
    (out,) = run_augment(DeviceAugmentSpec(), [hwc])
    assert np.array_equal(out, hwc.astype(np.float32))


def test_flips_are_per_sample_with_the_asked_probability():
    batch = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).view(2, 3, 2, 2).repeat(500, 1, 1, 1)
    out = DeviceAugment(DeviceAugmentSpec(hflip=0.5), seed=3)(batch)
    flipped = (out == batch.flip(-1).float()).flatten(1).all(1)
    assert (flipped | (out == batch.float()).flatten(1).all(1)).all()  # each sample: flipped or not
    assert 0.4 < flipped.float().mean().item() < 0.6


@pytest.mark.parametrize("k", [1, 2, 3])
def test_torch_rot90_on_chw_turns_the_same_way_as_numpy_and_albumentations(square, k):
    out = hwc_of(torch.rot90(chw(square), k, dims=(-2, -1)))
    assert np.array_equal(out, np.rot90(square, k, axes=(0, 1)))  # counter-clockwise
    assert np.array_equal(out, A.augmentations.geometric.functional.rot90(square, k))
    if k == 1:  # the top-right pixel moves to the top-left corner
        assert np.array_equal(out[0, 0], square[0, -1])


def test_device_rot90_gives_only_the_four_numpy_rotations(square):
    outs = run_augment(DeviceAugmentSpec(rot90=True), [square] * 64, seed=1)
    rotations = [np.rot90(square, k, axes=(0, 1)).astype(np.float32) for k in range(4)]
    seen = {next(k for k, r in enumerate(rotations) if np.array_equal(o, r)) for o in outs}
    assert seen == {0, 1, 2, 3}


def test_dihedral_views_are_the_eight_distinct_d4_pixel_permutations(square):
    x = chw(square)
    views = [hwc_of(dihedral(x, v)) for v in range(8)]
    members = ["e", "r90", "r180", "r270", "v", "hvt", "h", "t"]
    d4 = [A.augmentations.geometric.functional.d4(square, m) for m in members]
    for v in views:  # every view is one of albumentations' D4 elements, and all differ
        assert sum(np.array_equal(v, d) for d in d4) == 1
    assert len({v.tobytes() for v in views}) == 8
    for v in views:  # a permutation: the same multiset of pixels
        assert np.array_equal(np.sort(v.reshape(-1, 3), axis=0), np.sort(square.reshape(-1, 3), axis=0))


def test_dihedral_named_views_match_numpy(square):
    x = chw(square)
    assert np.array_equal(hwc_of(dihedral(x, 0)), square)
    assert np.array_equal(hwc_of(dihedral(x, 1)), np.rot90(square, 1))
    assert np.array_equal(hwc_of(dihedral(x, 4)), square.transpose(1, 0, 2))
    assert np.array_equal(hwc_of(dihedral(x, 5)), np.flip(square, axis=1))  # predict's TTA "flip" view
    assert np.array_equal(hwc_of(dihedral(x, 7)), np.flip(square, axis=0))


def test_dihedral_works_on_batches_like_on_single_images(square):
    batch = torch.stack([chw(square), chw(square[::-1])])
    for v in range(8):
        out = dihedral(batch, v)
        assert torch.equal(out[1], dihedral(batch[1], v))


def test_normalize_matches_albumentations_normalize(hwc):
    ours = hwc_of(normalize(chw(hwc)[None], IMAGENET_MEAN, IMAGENET_STD)[0])
    ref = A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0)(image=hwc)["image"]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_normalize_accepts_the_float_output_of_device_augment(hwc):
    x = chw(hwc)[None]
    aug = DeviceAugment(DeviceAugmentSpec(), seed=0)(x)
    assert torch.allclose(normalize(aug, IMAGENET_MEAN, IMAGENET_STD), normalize(x, IMAGENET_MEAN, IMAGENET_STD))


def test_noise_has_the_gauss_noise_std_range_and_probability():
    lo, hi = 10 / 255, 25 / 255
    spec = DeviceAugmentSpec(noise=0.3, noise_std=(lo, hi))
    x = torch.full((400, 3, 16, 16), 128, dtype=torch.uint8)
    out = DeviceAugment(spec, seed=0)(x)
    std = (out - 128.0).flatten(1).std(1)
    noisy = std > 1.0
    assert 0.22 < noisy.float().mean().item() < 0.38
    assert (std[~noisy] == 0).all()  # untouched samples stay exact
    assert std[noisy].min().item() > lo * 255 * 0.8 and std[noisy].max().item() < hi * 255 * 1.2
    assert out.min().item() >= 0 and out.max().item() <= 255  # clipped like uint8 GaussNoise


def test_noise_std_matches_albumentations_gauss_noise():
    lo, hi = 10 / 255, 25 / 255
    img = np.full((32, 32, 3), 128, np.uint8)
    ref = A.Compose([A.GaussNoise(std_range=(lo, hi), p=1.0)], seed=0)
    ref_std = np.mean([ref(image=img)["image"].astype(np.float32).std() for _ in range(200)])
    ours = DeviceAugment(DeviceAugmentSpec(noise=1.0, noise_std=(lo, hi)), seed=0)(chw(img)[None].repeat(200, 1, 1, 1))
    ours_std = (ours - 128.0).flatten(1).std(1).mean().item()
    assert abs(ours_std - ref_std) / ref_std < 0.1


def test_same_seed_same_augmentation_on_the_same_batch(hwc):
    spec = build_device_augment("seed")
    batch = torch.stack([chw(hwc)] * 8)
    assert torch.equal(DeviceAugment(spec, seed=5)(batch), DeviceAugment(spec, seed=5)(batch))
    assert not torch.equal(DeviceAugment(spec, seed=5)(batch), DeviceAugment(spec, seed=6)(batch))


def test_presets_put_flips_and_noise_on_the_device():
    seed = build_device_augment("seed")
    assert (seed.hflip, seed.vflip, seed.noise, seed.rot90) == (0.5, 0.5, 0.3, False)
    assert build_device_augment("winner").rot90 is True
    assert build_device_augment("none") == DeviceAugmentSpec()


@pytest.mark.parametrize("preset", ["d4", "crop"])
def test_dihedral_presets_squash_for_evaluation_and_draw_every_view_in_training(preset):
    wide = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    assert build_eval_transform(preset, 16)(image=wide)["image"].shape == (16, 16, 3)
    assert build_train_transform(preset, 16)(image=wide)["image"].shape == (16, 16, 3)
    spec = build_device_augment(preset)
    assert spec.hflip == spec.vflip == 0.5 and spec.rot90 and spec.noise == 0


def test_tta_choices_of_the_config_are_the_views_prediction_knows():
    from rockcls.core.config import TTA_MODES
    from rockcls.training.transforms import TTA_VIEWS

    assert set(TTA_MODES) == set(TTA_VIEWS)
