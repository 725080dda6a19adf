"""Messy names on disk: file names that are not valid UTF-8 and symbolic link loops end as data
problems or escaped ids, never as a traceback, in indexing, prepare, train and predict."""

from __future__ import annotations

import codecs
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from rockcls.commands import predict as predict_cmd
from rockcls.commands import prepare as prepare_cmd
from rockcls.core.entry import run_command
from rockcls.core.errors import DataError
from rockcls.data.index import content_fingerprint, file_fingerprint, index_dataset
from rockcls.data.sources import validate_images
from rockcls.data.synthetic import make_dataset
from rockcls.training.plan import load_dataset
from rockcls.training.trainer import run_training
from tests.conftest import tiny_config

LATIN1 = b"\xff\xfename.png"  # what a Latin-1 system writes for "ÿþname.png": not valid UTF-8


def add_file(folder: Path, name: bytes, payload: bytes) -> str:
    """Write ``payload`` under the byte name ``name``; return the path as Python lists it."""
    path = os.path.join(os.fsencode(folder), name)
    with open(path, "wb") as f:
        f.write(payload)
    return os.fsdecode(path)


@pytest.fixture
def two_classes(tmp_path) -> Path:
    return make_dataset(tmp_path / "train", {"granite": 5, "basalt": 5}, size=24, seed=0)


def test_a_file_name_that_is_not_utf8_gets_an_escaped_id_and_keeps_its_path(two_classes):
    png = (two_classes / "granite" / "0000.png").read_bytes()
    path = add_file(two_classes / "granite", LATIN1, png)
    index = index_dataset(two_classes)
    row = index.paths.index(path)
    assert index.ids[row] == "granite/\\xff\\xfename.png"
    assert codecs.escape_decode(index.ids[row].encode())[0] == b"granite/" + LATIN1  # lossless
    assert len(file_fingerprint(index.paths)) == 16 and len(content_fingerprint(index)) == 16


def test_prepare_caches_a_file_whose_name_is_not_utf8(two_classes, tmp_path, capsys):
    add_file(two_classes / "granite", LATIN1, (two_classes / "granite" / "0000.png").read_bytes())
    argv = ["--data", str(two_classes), "--img-size", "16", "--cache-dir", str(tmp_path / "cache")]
    assert run_command(prepare_cmd.main, argv) == 0
    assert "prepare: 11 images cached" in capsys.readouterr().out


def test_a_bad_image_whose_name_is_not_utf8_is_named_in_ascii_and_listed(two_classes, tmp_path):
    add_file(two_classes / "basalt", LATIN1, b"not an image")
    report = tmp_path / "problems.tsv"
    with pytest.raises(DataError) as err:
        validate_images(index_dataset(two_classes, check=False), skip_bad=False, report=report)
    message = str(err.value)
    assert message.startswith("data: 1 bad image; first: ") and "\n" not in message
    assert ascii(os.fsdecode(LATIN1)).strip("'") in message and message.isprintable()
    rows = [line.split("\t") for line in report.read_text(encoding="utf-8").splitlines()]
    assert rows[1][0] == "bad image" and rows[1][1].endswith("basalt/\\xff\\xfename.png")  # escaped


def test_a_class_folder_or_parameter_that_is_not_utf8_is_one_line(two_classes, tmp_path, capsys):
    argv = ["--data", os.fsdecode(os.fsencode(tmp_path) + b"/\xff"), "--img-size", "16"]
    assert run_command(prepare_cmd.main, argv) == 2
    expected = f"rockcls: error: data: {ascii(argv[1])} is not valid UTF-8; rename it or give another path\n"
    assert capsys.readouterr().err == expected
    os.rename(two_classes / "basalt", os.path.join(os.fsencode(two_classes), b"bas\xe4lt"))
    with pytest.raises(DataError, match=r"^data: class folder .*bas\\udce4lt' has a name that is not valid UTF-8"):
        index_dataset(two_classes)


def test_train_and_predict_with_names_that_are_not_utf8_lose_nothing(two_classes, mlflow_store, tmp_path):
    """Train uses the image under its exact name and skips a bad one (listed, escaped); predict
    predicts every readable row, keeps the unreadable ones with their error, and writes them all."""
    png = (two_classes / "granite" / "0000.png").read_bytes()
    add_file(two_classes / "granite", LATIN1, png)
    add_file(two_classes / "basalt", b"\xe4broken.png", b"not an image")
    result = run_training(tiny_config(two_classes, epochs=1, folds=1, val_fraction=0.5, skip_bad_images=True,
                                      cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out")))
    assert "granite/\\xff\\xfename.png" in result.ids
    client = MlflowClient()
    skipped = Path(client.download_artifacts(result.run_id, "skipped_images.tsv", str(tmp_path))).read_text("utf-8")
    assert "\\xe4broken.png\tnot a decodable image" in skipped

    test = tmp_path / "test"
    test.mkdir()
    shutil.copy(two_classes / "basalt" / "0001.png", test / "0001.png")
    add_file(test, LATIN1, png)
    add_file(test, b"\xe4broken.png", b"not an image")
    out = tmp_path / "submission.csv"
    argv = ["--model", f"runs:/{result.run_id}", "--data", str(test), "--out", str(out), "--tta", "none",
            "--num-workers", "0", "--device", "cpu"]
    assert run_command(predict_cmd.main, argv) == 0
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame["ID"]) == ["0001.png", "\\xe4broken.png", "\\xff\\xfename.png"]
    assert frame["rock_type"][2] != "" and frame["rock_type"][1] == ""
    assert frame["error"][1].startswith("not a decodable image")
    with np.load(out.with_name("submission_logits.npz")) as z:
        assert os.fsencode(str(z["paths"][2])) == os.fsencode(test) + b"/" + LATIN1  # the exact name


def test_a_symbolic_link_loop_in_a_class_folder_is_a_bad_file(two_classes, tmp_path):
    folder = two_classes / "granite"
    os.symlink("loop", folder / "loop")  # ln -s loop loop
    os.symlink("b.png", folder / "a.png")  # a -> b -> a
    os.symlink("a.png", folder / "b.png")
    with pytest.raises(DataError) as err:
        load_dataset(tiny_config(two_classes, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out")))
    message = str(err.value)
    assert message.startswith("data: 3 bad images; first: ") and "\n" not in message
    assert f"{folder / 'a.png'}: unreadable (Too many levels of symbolic links)" in message
    assert f"{folder / 'loop'}: unreadable (Too many levels of symbolic links)" in message
    index = validate_images(index_dataset(two_classes, check=False), skip_bad=True, report=tmp_path / "p.tsv")
    assert len(index) == 10 and sorted(Path(p).name for p, _ in index.skipped) == ["a.png", "b.png", "loop"]


def test_a_symbolic_link_loop_beside_the_class_folders_is_named(two_classes):
    os.symlink("loop", two_classes / "loop")
    with pytest.raises(DataError, match=r"^data: 1 unreadable folder entry; first: .*/loop: unreadable \(Too many "):
        index_dataset(two_classes)
