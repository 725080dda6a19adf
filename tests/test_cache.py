"""The decode-once image cache (rockcls.data.cache) and ``rockcls prepare``."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import pickle
import shutil
import time
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from rockcls.commands import prepare
from rockcls.commands.cli import main as cli_main
from rockcls.core.errors import ConfigError, DataError
from rockcls.data import cache as cache_module
from rockcls.data import images as data
from rockcls.data.cache import (
    ImageCache,
    build_cache,
    cache_files,
    load_cache,
    open_cache,
    resize_for_cache,
    cache_settings,
    resolve_cache_size,
)
from rockcls.data.images import load_image
from rockcls.data.index import index_dataset
from rockcls.data.sources import FileSource, ImageDataset, open_source, validate_images
from rockcls.training.plan import train_cache_settings
from rockcls.data.synthetic import make_dataset
from tests.conftest import wait_for_a_new_timestamp_tick


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Two small classes with mixed sizes (about 38-62 px), written per test (tests modify files)."""
    return make_dataset(tmp_path / "train", [5, 4], size=50, seed=3)


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


class DecodeCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = data.load_image

        def counting(path):
            self.calls += 1
            return original(path)
        monkeypatch.setattr(data, "load_image", counting)


def forbid_decoding(monkeypatch) -> None:
    def fail(path):
        raise AssertionError(f"decoded {path} on a warm path")
    monkeypatch.setattr(data, "load_image", fail)


def expected_rows(paths, size) -> list[np.ndarray]:
    return [resize_for_cache(load_image(p), size) for p in paths]


def cache_files_in(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in (cache_dir / "images").iterdir())


# ---------------------------------------------------------------------------- geometry

def test_cache_size_defaults_to_eight_sevenths_of_the_training_size(caplog):
    assert resolve_cache_size(224) == 256
    assert resolve_cache_size(224, 320) == 320
    with caplog.at_level(logging.WARNING, logger="rockcls"):
        assert resolve_cache_size(224, 128) == 128
    assert "upscaled" in caplog.text


def test_resize_keeps_the_aspect_ratio_and_never_upscales():
    landscape = np.zeros((380, 501, 3), np.uint8)
    assert resize_for_cache(landscape, 256).shape == (256, 338, 3)
    small = np.arange(40 * 30 * 3, dtype=np.uint8).reshape(40, 30, 3)
    assert np.array_equal(resize_for_cache(small, 256), small)
    strip = np.zeros((100, 2000, 3), np.uint8)  # the longer side is capped at 4x the size
    assert resize_for_cache(strip, 64).shape == (13, 256, 3)


# ---------------------------------------------------------------------------- build and read

def test_built_cache_holds_every_image_resized_once(dataset, cache_dir):
    paths = index_dataset(dataset).paths
    built = build_cache(paths, cache_dir=cache_dir, size=32, workers=2)
    assert built.reasons == [""] * len(paths)
    want = expected_rows(paths, 32)
    assert len(built.cache) == len(paths)
    for row, img in enumerate(want):
        got = built.cache.read(row)
        assert got.dtype == np.uint8 and got.flags.writeable
        assert np.array_equal(got, img)
    assert min(built.cache.read(0).shape[:2]) == 32
    assert built.cache.nbytes == sum(a.nbytes for a in want)
    assert not [n for n in cache_files_in(cache_dir) if "tmp" in n]


def test_open_source_follows_the_train_config(dataset, mlflow_store, tiny_cfg, tmp_path):
    index = index_dataset(dataset)
    source = open_source(index, train_cache_settings(tiny_cfg(dataset, cache=True, img_size=32)))
    assert isinstance(source, ImageCache) and source.size == 37  # round(32 * 8 / 7)
    assert source.data_path.parent == Path(os.environ["ROCKCLS_CACHE_DIR"]) / "images"
    assert isinstance(open_source(index, train_cache_settings(tiny_cfg(dataset, cache=False))), FileSource)
    explicit = open_source(index, train_cache_settings(tiny_cfg(dataset, cache=True, cache_size=20, cache_dir=str(tmp_path / "there"))))
    assert explicit.size == 20 and explicit.data_path.parent == tmp_path / "there" / "images"


def test_warm_cache_opens_without_decoding(dataset, cache_dir, monkeypatch):
    index = index_dataset(dataset)
    first = open_source(index, cache_settings(img_size=32, cache_size=32, cache_dir=cache_dir))
    forbid_decoding(monkeypatch)
    second = open_source(index, cache_settings(img_size=32, cache_size=32, cache_dir=cache_dir))
    assert second.data_path == first.data_path
    assert np.array_equal(second.read(3), first.read(3))


def test_another_cache_size_is_another_cache(dataset, cache_dir):
    index = index_dataset(dataset)
    a = open_source(index, cache_settings(img_size=24, cache_size=24, cache_dir=cache_dir))
    b = open_source(index, cache_settings(img_size=40, cache_size=40, cache_dir=cache_dir))
    assert a.data_path != b.data_path and min(b.read(0).shape[:2]) == 40


def test_changing_a_file_invalidates_the_cache(dataset, cache_dir):
    index = index_dataset(dataset)
    old = open_source(index, cache_settings(img_size=32, cache_size=32, cache_dir=cache_dir))
    victim = index.paths[2]
    cv2.imwrite(victim, np.full((45, 45, 3), 7, np.uint8))
    os.utime(victim, ns=(10**18, 10**18))  # a new mtime even within the file system's resolution
    new = open_source(index, cache_settings(img_size=32, cache_size=32, cache_dir=cache_dir))
    assert new.data_path != old.data_path
    assert (new.read(2) == 7).all()
    assert np.array_equal(new.read(1), old.read(1))


def test_rewriting_a_file_and_restoring_its_mtime_still_invalidates_the_cache(tmp_path, cache_dir):
    """BMP files of one size have one byte length: the rewrite keeps size, mtime and inode."""
    for c, name in enumerate(("a", "b")):
        (tmp_path / "bmp" / name).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(tmp_path / "bmp" / name / f"{i}.bmp"), np.full((20, 20, 3), 10 * (c + i), np.uint8))
    index = index_dataset(tmp_path / "bmp")
    old = open_source(validate_images(index, skip_bad=False, cache_dir=cache_dir, cache_size=20),
                      cache_settings(img_size=20, cache_size=20, cache_dir=cache_dir))
    victim = Path(index.paths[1])
    before = victim.stat()
    wait_for_a_new_timestamp_tick(before.st_ctime_ns)
    with open(victim, "r+b") as fh:
        fh.write(cv2.imencode(".bmp", np.full((20, 20, 3), 200, np.uint8))[1].tobytes())
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert victim.stat().st_size == before.st_size and victim.stat().st_ino == before.st_ino
    new = open_source(validate_images(index, skip_bad=False, cache_dir=cache_dir, cache_size=20),
                      cache_settings(img_size=20, cache_size=20, cache_dir=cache_dir))
    assert new.data_path != old.data_path
    assert (new.read(1) == 200).all() and (old.read(1) == 10).all()


def test_adding_a_file_invalidates_the_cache(dataset, cache_dir):
    old = open_source(index_dataset(dataset), cache_settings(img_size=32, cache_size=32, cache_dir=cache_dir))
    shutil.copy(index_dataset(dataset).paths[0], dataset / "synthetic_banded" / "extra.png")
    index = index_dataset(dataset)
    new = open_source(index, cache_settings(img_size=32, cache_size=32, cache_dir=cache_dir))
    assert new.data_path != old.data_path and len(new) == len(old) + 1 == len(index)


def test_truncated_pixel_or_manifest_file_is_never_read(dataset, cache_dir):
    paths = index_dataset(dataset).paths
    built = build_cache(paths, cache_dir=cache_dir, size=32)
    with open(built.cache.data_path, "r+b") as f:
        f.truncate(built.cache.nbytes // 2)
    assert load_cache(cache_dir, paths, size=32) is None
    manifest = built.cache.data_path.with_suffix(".npz")
    manifest.write_bytes(manifest.read_bytes()[:50])
    assert load_cache(cache_dir, paths, size=32) is None
    rebuilt = open_cache(paths, cache_dir=cache_dir, size=32)
    assert rebuilt.data_path.stat().st_size == rebuilt.nbytes
    assert np.array_equal(rebuilt.read(len(paths) - 1), expected_rows(paths[-1:], 32)[0])


def test_cache_of_unvalidated_bad_image_is_refused(dataset, cache_dir):
    index = index_dataset(dataset)
    Path(index.paths[0]).write_bytes(b"broken")
    with pytest.raises(DataError, match=r"cache: 1 image\(s\) cannot be decoded: .*0000\.png: not a decodable"):
        open_cache(index.paths, cache_dir=cache_dir, size=32)


def test_disk_full_is_a_one_line_error_and_leaves_no_temp_files(dataset, cache_dir, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cache_module, "_write_pixels", full)
    with pytest.raises(DataError, match=r"cache: disk full in .*images .*use cache=false"):
        build_cache(index_dataset(dataset).paths, cache_dir=cache_dir, size=32)
    assert cache_files_in(cache_dir) == []


def test_cache_pickles_without_its_mapping(dataset, cache_dir):
    source = open_source(index_dataset(dataset), cache_settings(img_size=32, cache_size=32, cache_dir=cache_dir))
    source.read(0)  # maps the file in this process
    blob = pickle.dumps(source)
    assert len(blob) < 4000
    copy = pickle.loads(blob)
    assert copy._data is None and np.array_equal(copy.read(4), source.read(4))


def test_dataloader_workers_read_the_same_batches_as_the_main_process(dataset, cache_dir):
    index = index_dataset(dataset)
    source = open_source(index, cache_settings(img_size=32, cache_size=32, cache_dir=cache_dir))
    crop = A.CenterCrop(30, 30)
    ds = ImageDataset(source, np.arange(len(index)), index.labels, crop)
    batches = [torch.utils.data.DataLoader(ds, batch_size=4, num_workers=n) for n in (0, 2)]
    for (x0, y0, p0), (x2, y2, p2) in zip(*batches):
        assert x0.dtype == torch.uint8 and torch.equal(x0, x2) and torch.equal(y0, y2) and torch.equal(p0, p2)


# ---------------------------------------------------------------------------- one decode pass

def test_validation_fills_the_cache_in_its_single_decode_pass(dataset, cache_dir, monkeypatch, caplog):
    index = index_dataset(dataset)
    Path(index.paths[1]).write_bytes(b"")
    counter = DecodeCounter(monkeypatch)
    valid = validate_images(index, skip_bad=True, cache_dir=cache_dir, workers=2, cache_size=32)
    assert "skipping 1 bad image" in caplog.text
    assert counter.calls == len(index)  # every file decoded exactly once
    assert [Path(p).name for p, _ in valid.skipped] == ["0001.png"]
    forbid_decoding(monkeypatch)
    source = open_source(valid, cache_settings(img_size=32, cache_size=32, cache_dir=cache_dir))
    assert len(source) == len(valid)
    again = validate_images(index_dataset(dataset), skip_bad=True, cache_dir=cache_dir, cache_size=32)  # all cached
    assert again.paths == valid.paths


# ---------------------------------------------------------------------------- concurrency

def _build_in_child(paths, cache_dir, barrier, rows_out):
    resize = cache_module.resize_for_cache

    def slow_resize(img, size):  # stretch the build so the two builders and the reader overlap
        time.sleep(0.02)
        return resize(img, size)
    cache_module.resize_for_cache = slow_resize
    barrier.wait()
    built = build_cache(paths, cache_dir=cache_dir, size=32, workers=2)
    rows_out.put([built.cache.read(i).tobytes() for i in range(len(paths))])


def test_two_concurrent_builders_and_a_reader_never_see_a_torn_cache(dataset, cache_dir):
    paths = index_dataset(dataset).paths
    want = [a.tobytes() for a in expected_rows(paths, 32)]
    ctx = multiprocessing.get_context("fork")
    barrier, rows_out = ctx.Barrier(3), ctx.Queue()
    builders = [ctx.Process(target=_build_in_child, args=(paths, cache_dir, barrier, rows_out)) for _ in range(2)]
    for p in builders:
        p.start()
    barrier.wait(timeout=60)
    complete_reads, deadline = 0, time.monotonic() + 120
    while (any(p.is_alive() for p in builders) or complete_reads == 0) and time.monotonic() < deadline:
        seen = load_cache(cache_dir, paths, size=32)
        if seen is not None:  # whenever a cache is visible, it is whole and right
            assert [seen.read(i).tobytes() for i in range(len(paths))] == want
            complete_reads += 1
    assert complete_reads > 0
    results = [rows_out.get(timeout=60) for _ in builders]
    for p in builders:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [want, want]
    data_file, manifest = cache_files(cache_dir, load_cache(cache_dir, paths, size=32).data_path.stem)
    assert cache_files_in(cache_dir) == sorted([data_file.name, manifest.name])  # no temp files left


def test_a_killed_builders_leftover_is_ignored_then_removed_when_stale(dataset, cache_dir):
    paths = index_dataset(dataset).paths
    (cache_dir / "images").mkdir(parents=True)
    stale, live = cache_dir / "images" / "build.tmp-99999-1.u8", cache_dir / "images" / "build.tmp-99998-1.u8"
    stale.write_bytes(b"\0" * 100)
    live.write_bytes(b"\0" * 100)
    os.utime(stale, (time.time() - 2 * cache_module.STALE_BUILD_S,) * 2)
    assert load_cache(cache_dir, paths, size=32) is None
    assert len(open_cache(paths, cache_dir=cache_dir, size=32)) == len(paths)
    assert not stale.exists() and live.exists()  # a fresh temp file may belong to a running builder


# ---------------------------------------------------------------------------- prepare command

def test_prepare_builds_then_reports_up_to_date(dataset, cache_dir, capsys):
    argv = ["--data", str(dataset), "--img-size", "32", "--cache-dir", str(cache_dir), "--workers", "2"]
    assert prepare.main(argv) == 0
    first = capsys.readouterr().out
    assert "9 images cached at 37 px (0 skipped)" in first and "built" in first
    assert prepare.main(argv) == 0
    assert "already up to date" in capsys.readouterr().out


def test_prepare_skip_bad_images_as_a_bare_flag_and_underscore_names(dataset, cache_dir, capsys, caplog):
    (dataset / "synthetic_grainy" / "bad.png").write_bytes(b"nope")
    argv = ["--data", str(dataset), "--cache_size", "24", "--cache_dir", str(cache_dir), "--skip-bad-images"]
    assert prepare.main(argv) == 0
    assert "bad.png" in caplog.text
    assert "9 images cached at 24 px (1 skipped)" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"1 bad image"):
        prepare.main([*argv, "--no-skip-bad-images"])  # the last of the two switches wins


def test_prepare_bad_input_ends_as_one_line_errors(tmp_path, capsys):
    assert cli_main(["prepare", "--data", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().endswith("missing does not exist")
    with pytest.raises(ConfigError, match="cache_size: must be >= 0, got -1"):
        prepare.main(["--data", str(tmp_path), "--cache-size", "-1"])
    with pytest.raises(ConfigError, match="workers: expected an integer, got 'many'"):
        prepare.main(["--data", str(tmp_path), "--workers", "many"])


# ---------------------------------------------------------------------------- training

def test_training_reads_the_cache(synthetic_dir, mlflow_store, tiny_cfg):
    from rockcls.training.trainer import run_training

    result = run_training(tiny_cfg(synthetic_dir, folds=1, epochs=1, cache=True))
    assert np.isfinite(result.cv_macro_f1)
    images = Path(os.environ["ROCKCLS_CACHE_DIR"]) / "images"
    assert [p.suffix for p in sorted(images.iterdir())] == [".npz", ".u8"]
