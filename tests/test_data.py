"""Indexing, decoding and validation of datasets on disk (rockcls.data: images, index, sources), bad input included."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from rockcls.core.errors import ConfigError, DataError
from rockcls.data import images as data
from rockcls.data.images import load_image, to_chw_tensor
from rockcls.data.index import file_fingerprint, index_dataset, list_files
from rockcls.data.folds import make_folds
from rockcls.data.sources import FileSource, ImageDataset, open_source, validate_images
from rockcls.data.synthetic import make_image
from tests.hostile import EPS_BYTES, png_header_only
from tests.conftest import wait_for_a_new_timestamp_tick


def write_png(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = cv2.imwrite(str(path), img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert ok
    return path


@pytest.fixture
def two_classes(tmp_path) -> Path:
    """Two classes of four 24x24 PNGs each."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("granite", "basalt")):
        for i in range(4):
            write_png(tmp_path / "train" / name / f"{i}.png", make_image(c, 24, rng))
    return tmp_path / "train"


def no_decoding(monkeypatch) -> None:
    def fail(path):
        raise AssertionError(f"decoded {path} on a warm path")
    monkeypatch.setattr(data, "load_image", fail)


# ---------------------------------------------------------------------------- indexing

def test_index_class_folders_sorted_labels_and_ids(two_classes):
    index = index_dataset(two_classes)
    assert index.classes == ["basalt", "granite"]
    assert index.ids[:4] == [f"basalt/{i}.png" for i in range(4)]
    assert index.labels.tolist() == [0] * 4 + [1] * 4
    assert all(Path(p).is_file() for p in index.paths)


def test_listing_order_matches_sorted_rglob_and_skips_hidden(tmp_path):
    names = ["a.png", "a/b.png", "a-b.png", "a b.png", "A.png", "a/z/y.png", "ab.png", "sub.d/q.png",
             "sub/q.png", ".hidden.png", ".ipynb_checkpoints/a.png"]
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_bytes(b"x")
    expected = sorted(p for p in tmp_path.rglob("*")
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(tmp_path).parts))
    assert list_files(tmp_path) == [str(p) for p in expected]
    assert not any(".ipynb_checkpoints" in p or ".hidden" in p for p in list_files(tmp_path))


def test_index_flat_folder_unlabeled(two_classes):
    index = index_dataset(two_classes, labeled=False)
    assert len(index) == 8 and (index.labels == -1).all() and index.classes == []
    assert index.ids[0] == os.path.join("basalt", "0.png")


def test_index_csv_with_relative_paths(two_classes):
    csv = two_classes.parent / "train.csv"
    csv.write_text("img_path,label\ntrain/granite/0.png,granite\ntrain/basalt/1.png,basalt\n")
    index = index_dataset(csv)
    assert index.classes == ["basalt", "granite"]
    assert index.labels.tolist() == [1, 0]
    assert Path(index.paths[0]).is_file()


def test_csv_with_wrong_columns_names_the_missing_column(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("path,rock\na.png,granite\n")
    with pytest.raises(DataError, match=r"train\.csv lacks column\(s\) img_path, label \(has: path, rock\)"):
        index_dataset(csv)


def test_csv_with_unknown_labels_is_rejected(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("img_path,label\na.png,granite\nb.png,marble\n")
    with pytest.raises(DataError, match=r"1 unknown label; first: .*train\.csv row 3: label 'marble' is not one "
                                        r"of the classes basalt, granite"):
        index_dataset(csv, classes=["basalt", "granite"])


def test_csv_with_empty_labels_names_every_row(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("img_path,label\na.png,granite\nb.png,\nc.png,basalt\nd.png, \n")
    with pytest.raises(DataError, match=r"2 empty labels; first: .*row 3: empty label; .*row 5: empty label"):
        index_dataset(csv)


def test_empty_class_folder_is_rejected(two_classes):
    (two_classes / "marble").mkdir()
    with pytest.raises(DataError, match=r"1 empty class folder; first: .*marble: holds no images"):
        index_dataset(two_classes)


CLUTTER = ("Thumbs.db", "desktop.ini", ".DS_Store", "README.txt", "0.png.json")


def test_clutter_in_class_folders_is_ignored_counted_and_logged_once(two_classes, tmp_path, caplog):
    for name in CLUTTER:
        (two_classes / "granite" / name).write_bytes(b"not an image")
    (two_classes / "basalt" / ".ipynb_checkpoints").mkdir()
    with caplog.at_level(logging.INFO, logger="rockcls"):
        index = index_dataset(two_classes)
    assert len(index) == 8 and all(Path(p).suffix == ".png" for p in index.paths)
    assert sorted(Path(p).name for p in index.ignored) == sorted([*CLUTTER, ".ipynb_checkpoints"])
    lines = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("ignored 6 file(s) that are not images")
    assert len(validate_images(index, skip_bad=False, cache_dir=tmp_path / "cache")) == 8


def test_a_file_with_an_image_extension_that_does_not_decode_stays_an_error(two_classes, tmp_path):
    (two_classes / "granite" / "Thumbs.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"1 bad image; first: .*Thumbs\.jpg: not a decodable image"):
        validate_images(index_dataset(two_classes), skip_bad=False, cache_dir=tmp_path / "cache")


def test_every_problem_of_the_data_is_reported_in_one_run_and_listed_in_a_file(two_classes, tmp_path):
    (two_classes / "marble").mkdir()
    for i in range(12):
        (two_classes / "granite" / f"broken{i:02d}.jpg").write_bytes(b"")
    (two_classes / "basalt" / "3.png").unlink()
    report = tmp_path / "out" / "data_problems.tsv"
    index = index_dataset(two_classes, check=False)
    with pytest.raises(DataError) as err:
        validate_images(index, skip_bad=False, cache_dir=tmp_path / "cache", min_per_class=4, report=report)
    message = str(err.value)
    assert message.startswith("data: 1 empty class folder, 12 bad images, 1 class with too few images; first: ")
    assert f"all 14 listed in {report}" in message and "skip_bad_images=true" in message
    assert "\n" not in message
    rows = [line.split("\t") for line in report.read_text().splitlines()]
    assert rows[0] == ["kind", "where", "detail"] and len(rows) == 15
    assert sorted(Path(w).name for k, w, _ in rows[1:] if k == "bad image") == [f"broken{i:02d}.jpg" for i in range(12)]
    assert {w: d for k, w, d in rows[1:] if k == "class with too few images"} == {
        "class 'basalt'": "has 3 usable image(s), the split needs 4"}  # marble: reported as an empty folder
    (two_classes / "marble").rmdir()
    for i in range(12):
        (two_classes / "granite" / f"broken{i:02d}.jpg").unlink()
    validate_images(index_dataset(two_classes), skip_bad=False, cache_dir=tmp_path / "cache", report=report)
    assert not report.exists()  # fixed data: the old list is gone


def test_skipping_bad_images_still_reports_the_other_problems(two_classes, tmp_path):
    (two_classes / "marble").mkdir()
    (two_classes / "granite" / "broken.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"^data: 1 empty class folder; first: .*marble: holds no images; all 1 "):
        validate_images(index_dataset(two_classes, check=False), skip_bad=True, cache_dir=tmp_path / "cache",
                        report=tmp_path / "problems.tsv")


def test_training_lists_the_data_problems_in_its_output_dir(two_classes, tmp_path):
    from rockcls.training.plan import load_dataset
    from tests.conftest import tiny_config

    (two_classes / "marble").mkdir()
    (two_classes / "basalt" / "broken.png").write_bytes(b"")
    cfg = tiny_config(two_classes, folds=5, output_dir=str(tmp_path / "outputs"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"1 empty class folder, 1 bad image, 2 classes with too few images; .*"
                                        r"all 4 listed in .*outputs/data_problems\.tsv"):
        load_dataset(cfg)


def test_single_class_is_rejected(tmp_path):
    write_png(tmp_path / "train" / "granite" / "0.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(DataError, match="has a single class \\('granite'\\); need at least two"):
        index_dataset(tmp_path / "train")


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data: .*nowhere does not exist"):
        index_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no dataset given"):
        index_dataset("")


# ---------------------------------------------------------------------------- decoding

def test_grayscale_rgba_16bit_are_converted_to_rgb_uint8(tmp_path):
    gray = write_png(tmp_path / "gray.png", np.full((12, 20), 200, np.uint8))
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([np.full((12, 20, 3), (10, 20, 30), np.uint8), np.full((12, 20), 128, np.uint8)]),
                    "RGBA").save(rgba)
    deep = write_png(tmp_path / "deep.png", np.full((12, 20), 65535, np.uint16))
    for path in (gray, rgba, deep):
        img = load_image(str(path))
        assert img.shape == (12, 20, 3) and img.dtype == np.uint8, path.name
    assert (load_image(str(gray)) == 200).all()
    assert load_image(str(rgba))[0, 0].tolist() == [10, 20, 30]  # channel order is RGB
    assert (load_image(str(deep)) == 255).all()  # 16-bit white stays white


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the upright image is portrait
    Image.fromarray(pixels).save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(str(tmp_path / "rot.jpg")).shape == (40, 20, 3)


def test_gif_is_decoded(tmp_path):
    Image.fromarray(np.full((10, 14, 3), 90, np.uint8)).save(tmp_path / "a.gif")
    assert load_image(str(tmp_path / "a.gif")).shape == (10, 14, 3)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"this is not an image at all", "not a decodable image"),
])
def test_bad_files_raise_a_data_error_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"x\.png: {reason}"):
        load_image(str(path))


def test_truncated_png_is_not_decodable(tmp_path):
    good = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8))[1]
    (tmp_path / "cut.png").write_bytes(good.tobytes()[: len(good) // 2])
    with pytest.raises(DataError, match=r"cut\.png: not a decodable image"):
        load_image(str(tmp_path / "cut.png"))


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(DataError, match=r"gone\.png: unreadable"):
        load_image(str(tmp_path / "gone.png"))


def test_png_header_claiming_40000x40000_is_refused_before_any_decoding(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(png_header_only(40000, 40000))
    monkeypatch.setattr(data.cv2, "imdecode", lambda *a: pytest.fail("decoded a refused image"))
    with pytest.raises(DataError, match=r"bomb\.png: too large \(.*limit 100000000 px; see ROCKCLS_MAX_PIXELS\)"):
        load_image(str(tmp_path / "bomb.png"))


def test_pixel_cap_comes_from_the_environment_and_a_bad_value_is_named(tmp_path, monkeypatch):
    path = write_png(tmp_path / "a.png", np.zeros((20, 30, 3), np.uint8))
    monkeypatch.setenv("ROCKCLS_MAX_PIXELS", "599")
    with pytest.raises(DataError, match=r"a\.png: too large \(30x20 px, limit 599 px"):
        load_image(str(path))
    assert load_image(str(path), max_pixels=600).shape == (20, 30, 3)
    monkeypatch.setenv("ROCKCLS_MAX_PIXELS", "lots")
    with pytest.raises(ConfigError, match="ROCKCLS_MAX_PIXELS: expected a positive number of pixels, got 'lots'"):
        validate_images(index_dataset(tmp_path, labeled=False), skip_bad=False, cache_dir=tmp_path / "c")


def test_formats_outside_the_allow_list_never_reach_their_decoder(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    # Opening EPS is the step that would run Ghostscript on the file; it must not even start.
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: pytest.fail("EPS opened"))
    (tmp_path / "drawing.png").write_bytes(EPS_BYTES)
    with pytest.raises(DataError, match=r"drawing\.png: not a decodable image \(not PNG, JPEG, BMP, TIFF, WEBP, GIF\)"):
        load_image(str(tmp_path / "drawing.png"))


@pytest.mark.parametrize("error", [MemoryError(), cv2.error("insufficient memory"), ValueError("odd")])
def test_any_decoder_failure_is_that_files_reason(tmp_path, monkeypatch, error):
    path = write_png(tmp_path / "a.png", np.zeros((20, 30, 3), np.uint8))

    def explode(*_):
        raise error
    monkeypatch.setattr(data.cv2, "imdecode", explode)
    with pytest.raises(DataError, match=r"a\.png: not (a )?decodable"):
        load_image(str(path))
    assert data.load_checked(str(path))[0].startswith("not ")


def test_path_with_a_nul_byte_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"unreadable \(embedded null byte\)"):
        load_image(str(tmp_path / "a\0.png"))


def test_fifo_and_folder_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # nobody writes: a plain open() would wait forever
    (tmp_path / "folder.png").mkdir()
    outcome = {}

    def read_both():
        outcome["reasons"] = [data.load_checked(str(tmp_path / n))[0] for n in ("pipe.png", "folder.png")]
    reader = threading.Thread(target=read_both, daemon=True)
    reader.start()
    reader.join(timeout=60)  # a guard against hanging the suite, not a speed check
    assert outcome.get("reasons") == ["unreadable (not a regular file)"] * 2


def test_bomb_header_is_skipped_with_its_reason_by_skip_bad_images(two_classes, tmp_path, caplog):
    (two_classes / "granite" / "bomb.png").write_bytes(png_header_only(40000, 40000))
    kept = validate_images(index_dataset(two_classes), skip_bad=True, cache_dir=tmp_path / "cache",
                           cache_size=32)
    assert "skipping 1 bad image" in caplog.text
    assert len(kept) == 8 and kept.skipped[0][1].startswith("too large (over")


def test_rewritten_file_with_its_mtime_restored_gets_a_new_fingerprint(two_classes):
    paths = index_dataset(two_classes).paths
    victim = Path(paths[0])
    before_stat, before = victim.stat(), file_fingerprint(paths)
    wait_for_a_new_timestamp_tick(before_stat.st_ctime_ns)
    with open(victim, "r+b") as fh:  # same inode, same size, other bytes
        fh.write(b"\x00" * before_stat.st_size)
    os.utime(victim, ns=(before_stat.st_atime_ns, before_stat.st_mtime_ns))
    after = victim.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before_stat.st_size, before_stat.st_mtime_ns,
                                                                before_stat.st_ino)
    assert file_fingerprint(paths) != before


# ---------------------------------------------------------------------------- validation

@pytest.fixture
def with_bad_files(two_classes) -> Path:
    """two_classes plus a corrupt, an empty, a too-small image and a non-image file."""
    (two_classes / "granite" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (two_classes / "granite" / "empty.jpg").write_bytes(b"")
    write_png(two_classes / "basalt" / "tiny.png", np.zeros((4, 30, 3), np.uint8))
    (two_classes / "basalt" / "notes.txt").write_text("field notes")
    return two_classes


def test_bad_images_fail_validation_with_their_names(with_bad_files, tmp_path):
    index = index_dataset(with_bad_files)
    with pytest.raises(DataError, match=r"3 bad images; first: .*tiny\.png: too small \(30x4 px, need 8\).*"
                                        r"skip_bad_images=true"):
        validate_images(index, skip_bad=False, cache_dir=tmp_path / "cache", workers=2)


def test_skip_bad_images_lists_every_skipped_file_with_its_reason(with_bad_files, tmp_path, caplog):
    index = index_dataset(with_bad_files)
    kept = validate_images(index, skip_bad=True, cache_dir=tmp_path / "cache", workers=2)
    assert "skipping 3 bad image(s)" in caplog.text
    assert len(kept) == 8
    reasons = {Path(p).name: r for p, r in kept.skipped}
    assert set(reasons) == {"corrupt.png", "empty.jpg", "tiny.png"}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["corrupt.png"].startswith("not a decodable image")
    assert [Path(p).name for p in kept.ignored] == ["notes.txt"]  # not an image: not part of the dataset


def test_class_with_only_bad_images_is_an_error(two_classes, tmp_path):
    for p in (two_classes / "basalt").iterdir():
        p.write_bytes(b"broken")
    with pytest.raises(DataError, match="class 'basalt': has no usable images"):
        validate_images(index_dataset(two_classes), skip_bad=True, cache_dir=tmp_path / "cache")


def test_second_validation_of_unchanged_files_decodes_nothing(with_bad_files, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = validate_images(index_dataset(with_bad_files), skip_bad=True, cache_dir=cache, workers=2)
    no_decoding(monkeypatch)
    second = validate_images(index_dataset(with_bad_files), skip_bad=True, cache_dir=cache, workers=2)
    assert second.paths == first.paths and second.skipped == first.skipped


def test_validation_runs_again_when_a_file_changes(two_classes, tmp_path):
    cache = tmp_path / "cache"
    validate_images(index_dataset(two_classes), skip_bad=False, cache_dir=cache)
    victim = two_classes / "granite" / "2.png"
    before = file_fingerprint(index_dataset(two_classes).paths)
    victim.write_bytes(b"now broken")
    os.utime(victim, ns=(1, 1))  # a different mtime even on coarse-grained file systems
    assert file_fingerprint(index_dataset(two_classes).paths) != before
    with pytest.raises(DataError, match=r"granite/2\.png: not a decodable image"):
        validate_images(index_dataset(two_classes), skip_bad=False, cache_dir=cache)


def test_foreign_or_torn_verdict_file_is_ignored(two_classes, tmp_path):
    cache = tmp_path / "cache"
    index = index_dataset(two_classes)
    validate_images(index, skip_bad=False, cache_dir=cache)
    (verdicts,) = (cache / "index").iterdir()
    verdicts.write_text('{"reasons": ["")')  # cut short
    assert len(validate_images(index, skip_bad=False, cache_dir=cache)) == 8
    assert json.loads(verdicts.read_text()) == {"reasons": [""] * 8}  # rewritten whole


# ---------------------------------------------------------------------------- sources

def test_file_source_and_dataset_give_uint8_chw(two_classes):
    index = index_dataset(two_classes)
    source = open_source(index)
    assert isinstance(source, FileSource) and len(source) == 8
    ds = ImageDataset(source, [3, 5], index.labels[[3, 5]])
    x, y, pos = ds[1]
    assert x.dtype == torch.uint8 and x.shape == (3, 24, 24)
    assert (y, pos) == (1, 1)
    assert np.array_equal(x.permute(1, 2, 0).numpy(), load_image(index.paths[5]))


def test_to_chw_tensor_equals_permute_and_is_contiguous():
    img = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)[3:25, 5:33]  # a crop: a view
    out = to_chw_tensor(img)
    assert out.is_contiguous() and out.dtype == torch.uint8
    assert torch.equal(out, torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
    assert to_chw_tensor(img[..., 0]).shape == (1, 22, 28)  # a single-channel transform output


# ---------------------------------------------------------------------------- splits

@pytest.mark.parametrize("counts, val_fraction, message", [
    ([2, 2, 2], 0.2, r"folds=1 with val_fraction=0.2 holds out 2 of 6 images, fewer than the 3 classes"),
    ([2, 2, 2], 0.9, r"folds=1 with val_fraction=0.9 leaves 0 of 6 images to train on, fewer than the 3 classes"),
    ([5, 1], 0.2, r"class #1 has 1 image\(s\), fewer than the 2 a stratified split with folds=1 needs"),
])
def test_holdout_with_too_few_images_per_class_is_a_one_line_error(counts, val_fraction, message):
    labels = np.repeat(np.arange(len(counts)), counts)
    with pytest.raises(DataError, match=message):
        make_folds(labels, folds=1, val_fraction=val_fraction, seed=0)
