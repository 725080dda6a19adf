"""Tests for rockcls.inference.predictor and the predict command: TTA views, batched prediction, fold averaging, the predict command."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from rockcls.commands import predict as predict_cmd
from rockcls.core import errors as predict_errors
from rockcls.core.entry import run_command
from rockcls.core.errors import DataError
from rockcls.data.sources import FileSource, ImageDataset
from rockcls.data.synthetic import make_image
from rockcls.inference import predictor as predict
from rockcls.training import transforms as predict_transforms
from rockcls.training.engine import StepSettings, evaluate
from rockcls.training.models import build_model, model_spec
from rockcls.training.trainer import run_training
from rockcls.training.transforms import build_eval_transform, dihedral
from tests.conftest import tiny_config

CLASSES = ["a", "b", "c"]




@pytest.fixture(scope="module")
def train_run(store, synthetic_dir):
    return run_training(tiny_config(synthetic_dir))


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    model = build_model("test_efficientnet", len(CLASSES)).eval()
    return model, model_spec(model, "test_efficientnet", CLASSES, 32, "seed")


def _write_images(folder: Path, images: list[np.ndarray]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(str(folder / f"{i:03d}.png"))
        cv2.imwrite(paths[-1], cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return paths


def _square_images(n: int, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [make_image(i % 3, size, rng) for i in range(n)]


# ---- TTA views ------------------------------------------------------------------------


def test_tta_views_are_exact_pixel_permutations() -> None:
    x = torch.randperm(2 * 3 * 6 * 6).view(2, 3, 6, 6)
    outputs = []
    for view in predict_transforms.TTA_VIEWS["d4"]:
        y = dihedral(x, view)
        assert y.shape == x.shape
        for plane_in, plane_out in zip(x.flatten(0, 1), y.flatten(0, 1)):  # each channel keeps its pixels
            assert torch.equal(plane_in.flatten().sort().values, plane_out.flatten().sort().values)
        outputs.append(y)
    assert len({tuple(y.flatten().tolist()) for y in outputs}) == 8  # 8 distinct views
    assert torch.equal(outputs[0], x)
    flips = [dihedral(x, v) for v in predict_transforms.TTA_VIEWS["flip"]]
    assert [torch.equal(a, b) for a, b in zip(flips, [x, x.flip(-1), x.flip(-2)])] == [True, True, True]
    assert predict_transforms.TTA_VIEWS["none"] == (0,)


def test_identity_view_reproduces_plain_prediction(tmp_path, random_model) -> None:
    model, spec = random_model
    paths = _write_images(tmp_path, _square_images(6, size=40))
    logits, errors = predict.predict_logits([random_model], FileSource(paths), tta="none", batch_size=4)
    ds = ImageDataset(FileSource(paths), np.arange(len(paths)), np.zeros(len(paths)),
                      build_eval_transform("seed", 32))
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    s = StepSettings(device=torch.device("cpu"), mean=tuple(spec["mean"]), std=tuple(spec["std"]))
    plain = torch.log_softmax(torch.from_numpy(evaluate(model, loader, s)["logits"]), dim=1).numpy()
    assert errors == [""] * len(paths)
    np.testing.assert_allclose(logits, plain, atol=1e-5)


def test_d4_prediction_is_invariant_to_rotating_and_flipping_the_image(tmp_path, random_model) -> None:
    base = _square_images(4)
    rotated = [np.ascontiguousarray(np.rot90(img)) for img in base]
    h_mirror = [np.ascontiguousarray(img[:, ::-1]) for img in base]
    v_mirror = [np.ascontiguousarray(img[::-1]) for img in base]
    paths = _write_images(tmp_path, base + rotated + h_mirror + v_mirror)
    d4, _ = predict.predict_logits([random_model], FileSource(paths), tta="d4")
    for k in (1, 2, 3):  # d4 is a group: the views of a rotated or mirrored image are the same 8
        np.testing.assert_allclose(d4[:4], d4[4 * k:4 * k + 4], atol=1e-5)
    plain, _ = predict.predict_logits([random_model], FileSource(paths), tta="none")
    assert np.abs(plain[:4] - plain[4:8]).max() > 1e-4  # without TTA a random model is not invariant
    flip, _ = predict.predict_logits([random_model], FileSource(paths), tta="flip")
    by_hand = np.log(np.mean([np.exp(plain[:4]), np.exp(plain[8:12]), np.exp(plain[12:])], axis=0))
    np.testing.assert_allclose(flip[:4], by_hand, atol=1e-5)  # flip = identity, h-flip, v-flip


def test_unknown_tta_is_refused(random_model) -> None:
    with pytest.raises(predict_errors.ConfigError, match="tta: must be one of none, flip, d4; got 'd8'"):
        predict.predict_logits([random_model], FileSource([]), tta="d8")


def test_unreadable_rows_get_nan_scores_and_a_reason(tmp_path, random_model) -> None:
    paths = _write_images(tmp_path, _square_images(2))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    paths += [str(tmp_path / "broken.png"), str(tmp_path / "missing.png")]
    _write_images(tmp_path / "tiny", [np.zeros((4, 4, 3), np.uint8)])
    paths.append(str(tmp_path / "tiny" / "000.png"))
    logits, errors = predict.predict_logits([random_model], FileSource(paths), tta="flip", batch_size=2)
    assert errors[:2] == ["", ""]
    assert "not a decodable image" in errors[2]
    assert "unreadable" in errors[3]
    assert errors[4].startswith("too small (4x4 px")
    assert np.isfinite(logits[:2]).all() and np.isnan(logits[2:]).all()
    pred = predict.Prediction(logits, CLASSES, errors)
    assert pred.labels[2:] == ["", "", ""] and all(label in CLASSES for label in pred.labels[:2])
    np.testing.assert_allclose(pred.probs[:2].sum(1), 1.0, atol=1e-6)


# ---- train runs -----------------------------------------------------------------------


def test_train_run_predicts_with_the_mean_of_its_fold_models(train_run, synthetic_dir) -> None:
    predictor = predict_cmd.load_predictor(f"runs:/{train_run.run_id}")
    assert len(predictor.models) == 2 and predictor.classes == train_run.classes
    paths = sorted(str(p) for p in synthetic_dir.rglob("*.png"))[::9]
    pred = predictor.predict(paths, tta="flip", batch_size=4, device="cpu")
    folds = [np.exp(predict.predict_logits([m], FileSource(paths), tta="flip")[0]) for m in predictor.models]
    np.testing.assert_allclose(pred.probs, np.mean(folds, axis=0), atol=1e-5)
    assert pred.labels == [train_run.classes[k] for k in np.mean(folds, axis=0).argmax(1)]


def test_predict_command_writes_submission_logits_and_a_predict_run(train_run, synthetic_dir, store, caplog) -> None:
    images = sorted(synthetic_dir.rglob("*.png"))[::6]
    (store / "broken.png").write_bytes(b"\x89PNG garbage")
    rows = [(f"T{i:03d}", str(p)) for i, p in enumerate(images)] + [("TBAD", "broken.png")]
    pd.DataFrame(rows, columns=["ID", "img_path"]).to_csv(store / "test.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="rockcls"):
        assert predict_cmd.main(["--model", f"runs:/{train_run.run_id}", "--data", str(store / "test.csv"),
                             "--out", "sub/submission.csv", "--tta", "d4", "--num-workers", "0"]) == 0
    sub = pd.read_csv(store / "sub" / "submission.csv", keep_default_na=False)
    assert list(sub.columns) == ["ID", "rock_type", "error"]
    assert list(sub["ID"]) == [r[0] for r in rows]
    assert set(sub["rock_type"][:-1]) <= set(train_run.classes)
    assert sub.iloc[-1]["rock_type"] == "" and "not a decodable image" in sub.iloc[-1]["error"]
    assert "broken.png" in caplog.text
    with np.load(store / "sub" / "submission_logits.npz") as z:
        assert z["logits"].shape == (len(rows), 3) and np.isnan(z["logits"][-1]).all()
        assert list(z["classes"]) == train_run.classes and str(z["tta"]) == "d4"
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("rockcls").experiment_id],
                                      filter_string="tags.`rockcls.kind` = 'predict'")
    assert len(runs) == 1 and runs[0].data.params["resolved_tta"] == "d4"
    assert runs[0].data.metrics["num_errors"] == 1
    names = {a.path for a in MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert {"submission.csv", "submission_logits.npz", "errors.tsv"} <= names


def test_predict_command_on_a_folder_with_custom_columns(train_run, tmp_path) -> None:
    _write_images(tmp_path / "imgs", _square_images(3, size=40))
    assert predict_cmd.main(["--model", train_run.run_id, "--data", str(tmp_path / "imgs"), "--out",
                         str(tmp_path / "out.csv"), "--id_column", "file", "--label_column", "label",
                         "--num-workers", "0"]) == 0
    sub = pd.read_csv(tmp_path / "out.csv")
    assert list(sub.columns) == ["file", "label"]  # no error column when every image was read
    assert list(sub["file"]) == ["000.png", "001.png", "002.png"]


def test_no_readable_image_is_a_clear_failure(train_run, tmp_path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"none of the 1 image\(s\) could be read; first: .*x.png"):
        predict_cmd.main(["--model", train_run.run_id, "--data", str(tmp_path / "imgs"),
                      "--out", str(tmp_path / "o.csv"), "--num-workers", "0"])


@pytest.mark.parametrize("model, message", [
    ("abc", "model: expected runs:/<train run id>"),
    ("runs:/0123456789abcdef0123456789abcdef", "run '0123456789abcdef0123456789abcdef' not found"),
    ("", "model: required"),
])
def test_bad_model_references_end_as_one_line_errors(train_run, synthetic_dir, capsys, model, message) -> None:
    rc = run_command(predict_cmd.main, ["--model", model, "--data", str(synthetic_dir)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("rockcls: error: ") and message in err and "\n" not in err


def test_a_fold_run_is_not_a_model(train_run, synthetic_dir) -> None:
    fold = MlflowClient().search_runs(
        [MlflowClient().get_run(train_run.run_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{train_run.run_id}'")[0]
    with pytest.raises(predict_errors.RockclsError, match=f"run {fold.info.run_id} is a fold run, not a train run"):
        predict_cmd.load_predictor(fold.info.run_id)


def test_bad_tta_parameter_is_a_config_error(train_run, synthetic_dir) -> None:
    with pytest.raises(predict_errors.ConfigError, match="tta: must be one of auto, none, flip, d4; got 'rot'"):
        predict_cmd.main(["--model", train_run.run_id, "--data", str(synthetic_dir), "--tta", "rot"])
