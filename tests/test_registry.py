"""Tests for rockcls.runs.registry: the pyfunc ensemble model, registration and the champion alias."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rockcls.commands import predict
from rockcls.core import errors as registry_errors
from rockcls.core import names
from tests.hostile import EPS_BYTES, png_header_only
from rockcls.inference import serving
from rockcls.runs import ensemble, registry
from rockcls.runs import lookup as predict_lookup
from rockcls.training.trainer import run_training
from tests.conftest import tiny_config

NAME = "rockcls-test"




@pytest.fixture(scope="module")
def registered(store, synthetic_dir):
    """Two members on one split, fitted, logged and registered as version 1 (d4 TTA)."""
    a = run_training(tiny_config(synthetic_dir, epochs=1))
    b = run_training(tiny_config(synthetic_dir, epochs=1, lr=1e-3, backbone="test_vit"))
    fit = ensemble.fit_ensemble(ensemble.load_members([a.run_id, b.run_id]), bias=True)
    # Both members must carry weight for the packing to be tested; keep the fitted bias.
    fit = dataclasses.replace(fit, weights=np.array([0.7, 0.3]))
    run_id = ensemble.log_ensemble(fit, experiment="rockcls")
    reg = registry.register_ensemble(fit, name=NAME, run_id=run_id, tta="d4")
    return fit, run_id, reg


@pytest.fixture(scope="module")
def images(synthetic_dir) -> list[str]:
    return [str(p) for p in sorted(synthetic_dir.rglob("*.png"))[::12]]


@pytest.fixture(autouse=True)
def image_root(synthetic_dir, monkeypatch) -> Path:
    """A loaded model reads img_path only under a configured root: here, the synthetic images."""
    monkeypatch.setenv(serving.IMAGE_ROOT_ENV, str(synthetic_dir))
    return synthetic_dir


def test_first_registration_becomes_champion_and_keeps_its_score(registered) -> None:
    fit, run_id, reg = registered
    assert reg.version == "1" and reg.champion and reg.reason == "first champion"
    mv = MlflowClient().get_model_version_by_alias(NAME, "champion")
    assert str(mv.version) == "1"
    assert float(mv.tags[names.SCORE]) == fit.crossfit_score
    assert mv.tags["rockcls.members"] == ",".join(fit.run_ids) and mv.tags["rockcls.ensemble_run"] == run_id
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags["rockcls.model_version"] == "1" and tags[names.MODEL_URI].startswith("models:/")


def test_load_by_alias_predicts_paths_with_the_fitted_weights_and_bias(registered, images) -> None:
    fit, _, _ = registered
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = model.predict(pd.DataFrame({"img_path": images}))
    prob_cols = [f"prob_{c}" for c in fit.classes]
    assert list(out.columns) == ["label", *prob_cols, "error"]
    assert (out["error"] == "").all()
    np.testing.assert_allclose(out[prob_cols].sum(axis=1), 1.0, atol=1e-6)
    # the same rule by hand from the two train runs: softmax(log(sum_m w_m p_m) + b), with d4 TTA
    member_probs = [predict_lookup.load_run_predictor(r).predict(images, tta="d4", device="cpu").probs for r in fit.run_ids]
    scores = np.log(0.7 * member_probs[0] + 0.3 * member_probs[1]) + fit.bias
    expected = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    np.testing.assert_allclose(out[prob_cols].to_numpy(), expected, atol=1e-5)
    assert list(out["label"]) == [fit.classes[k] for k in scores.argmax(1)]


def test_base64_input_gives_the_same_predictions_as_paths(registered, images) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    encoded = [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in images]
    by_path = model.predict(pd.DataFrame({"img_path": images}), params={"tta": "none"})
    by_b64 = model.predict(pd.DataFrame({"image_b64": encoded}), params={"tta": "none"})
    pd.testing.assert_frame_equal(by_path, by_b64)
    as_data_url = model.predict(pd.DataFrame({"image_b64": ["data:image/png;base64," + encoded[0]]}),
                                params={"tta": "none"})
    pd.testing.assert_frame_equal(as_data_url, by_path.iloc[:1])
    assert not np.allclose(by_path.iloc[:, 1:-1], model.predict(pd.DataFrame({"img_path": images})).iloc[:, 1:-1])


def test_bad_rows_get_an_error_and_no_label(registered, images, tmp_path) -> None:
    (tmp_path / "good.png").write_bytes(Path(images[0]).read_bytes())
    (tmp_path / "bad.png").write_bytes(b"junk")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion", model_config={"image_root": str(tmp_path)})
    frame = pd.DataFrame({"img_path": ["good.png", "bad.png", "none.png", "", None],
                          "image_b64": [None, None, None, "%%%", None]})
    out = model.predict(frame)
    assert out["label"].iloc[0] != "" and out["error"].iloc[0] == ""
    assert list(out["label"].iloc[1:]) == ["", "", "", ""]
    assert out["error"].iloc[1] == "not a decodable image (not PNG, JPEG, BMP, TIFF, WEBP, GIF)"
    assert out["error"].iloc[2] == serving.PATH_REFUSED
    assert out["error"].iloc[3] == "image_b64: not valid base64"
    assert out["error"].iloc[4].startswith("no image given")
    assert out.iloc[1:, 1:-1].isna().all().all()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_img_path_is_refused_unless_an_image_root_is_configured(registered, images, monkeypatch) -> None:
    monkeypatch.delenv(serving.IMAGE_ROOT_ENV)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = model.predict(pd.DataFrame({"img_path": [images[0], None], "image_b64": [None, b64(Path(images[0]).read_bytes())]}))
    assert list(out["error"]) == [serving.PATH_DISABLED, ""]
    assert out["label"].iloc[0] == "" and out["label"].iloc[1] != ""
    monkeypatch.setenv(serving.IMAGE_ROOT_ENV, "/no/such/folder")
    with pytest.raises(Exception, match="ROCKCLS_IMAGE_ROOT: '/no/such/folder' is not a folder"):
        mlflow.pyfunc.load_model(f"models:/{NAME}@champion")


def test_img_path_is_confined_to_the_root_and_every_refusal_reads_the_same(registered, images, tmp_path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    image = Path(images[0]).read_bytes()
    (root / "sub" / "ok.png").write_bytes(image)
    (outside / "secret.png").write_bytes(image)
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "big.png").write_bytes(image + b"\0" * 4096)
    os.mkfifo(root / "fifo.png")  # opened without O_NONBLOCK this would hang the request thread
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion",
                                     model_config={"image_root": str(root), "max_image_bytes": len(image) + 100})
    good = ["sub/ok.png", str(root / "sub" / "ok.png"), str(root / "sub" / ".." / "sub" / "ok.png")]
    refused = [str(outside / "secret.png"), "../outside/secret.png", "link.png", "big.png", "fifo.png", "sub",
               "missing.png", "/etc/passwd", "sub/ok.png\0.txt", "/proc/self/mem"]
    out = model.predict(pd.DataFrame({"img_path": good + refused}))
    assert list(out["error"]) == [""] * len(good) + [serving.PATH_REFUSED] * len(refused)
    assert out["label"].iloc[:3].nunique() == 1 and out["label"].iloc[0] != ""
    assert out.iloc[3:, 1:-1].isna().all().all()


def test_image_b64_with_line_breaks_and_per_row_and_per_request_caps(registered, images) -> None:
    raw = [Path(p).read_bytes() for p in images[:3]]
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion", model_config={
        "max_image_bytes": max(map(len, raw)), "max_request_bytes": 2 * len(raw[0])})
    wrapped = base64.encodebytes(raw[0]).decode("ascii")  # 76 columns, like `base64` without -w0
    assert "\n" in wrapped.strip()
    out = model.predict(pd.DataFrame({"image_b64": [b64(raw[0]), wrapped, b64(raw[1]), b64(raw[2])]}),
                        params={"tta": "none"})
    assert out["error"].iloc[:2].tolist() == ["", ""]
    pd.testing.assert_series_equal(out.iloc[0], out.iloc[1], check_names=False)
    assert out["error"].iloc[2].startswith(f"request over {2 * len(raw[0])} bytes of images")
    assert out["error"].iloc[3].startswith("request over")
    too_big = b64(raw[0] + b"\0" * (max(map(len, raw)) + 10))
    out = model.predict(pd.DataFrame({"image_b64": [too_big, b64(raw[1])]}))
    assert out["error"].iloc[0] == f"image_b64: image over {max(map(len, raw))} bytes (ROCKCLS_MAX_IMAGE_BYTES)"
    assert out["error"].iloc[1] == "" and out["label"].iloc[1] != ""


def test_header_bombs_truncated_files_and_eps_get_their_reason_and_good_rows_are_still_predicted(
        registered, images) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    image = Path(images[0]).read_bytes()
    rows = [image, png_header_only(40000, 40000), image[: len(image) // 2], EPS_BYTES, image]
    out = model.predict(pd.DataFrame({"image_b64": [b64(r) for r in rows]}))
    assert out["error"].iloc[0] == "" and out["error"].iloc[4] == "" and out["label"].iloc[0] == out["label"].iloc[4] != ""
    assert out["error"].iloc[1].startswith("too large (") and "ROCKCLS_MAX_PIXELS" in out["error"].iloc[1]
    assert out["error"].iloc[2].startswith("not a decodable image")
    assert out["error"].iloc[3] == "not a decodable image (not PNG, JPEG, BMP, TIFF, WEBP, GIF)"
    assert out.iloc[1:4, 1:-1].isna().all().all()


def test_bad_batch_size_is_a_one_line_error_and_internal_errors_carry_no_traceback(registered, images,
                                                                                  monkeypatch) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    frame = pd.DataFrame({"img_path": images[:1]})
    for bad in (-1, 0):
        with pytest.raises(MlflowException, match=f"^batch_size: must be >= 1, got {bad}$"):
            model.predict(frame, params={"batch_size": bad})

    def broken(*args, **kwargs):
        raise RuntimeError("a bug deep in the model")

    monkeypatch.setattr(model.unwrap_python_model().predictor, "predict_source", broken)
    with pytest.raises(MlflowException) as info:
        model.predict(frame)
    assert info.value.message == "internal error while predicting (RuntimeError); see the server log"
    assert "Traceback" not in info.value.serialize_as_json() and info.value.get_http_status_code() == 500


def test_wrong_input_columns_and_bad_params_are_refused(registered) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    with pytest.raises(MlflowException, match="model input needs a column 'img_path'"):
        model.predict(pd.DataFrame({"path": ["x.png"]}))
    with pytest.raises(MlflowException, match="tta: must be one of none, flip, d4; got 'd8'"):
        model.predict(pd.DataFrame({"img_path": ["x.png"]}), params={"tta": "d8"})


def test_logged_model_has_signature_example_manifest_and_installable_requirements(registered) -> None:
    fit, _, _ = registered
    root = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"))
    reqs = (root / "requirements.txt").read_text().split()
    assert "torch==2.14.1" in reqs and "torchvision==0.29.1" in reqs and "timm==1.0.31" in reqs
    assert all("+" not in r for r in reqs), reqs  # no local version suffixes such as +cu130
    assert any(r.startswith("mlflow==") for r in reqs)
    info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    inputs = {c["name"]: c for c in info.signature.inputs.to_dict()}
    assert set(inputs) == {"img_path", "image_b64"} and not any(c["required"] for c in inputs.values())
    outputs = [c["name"] for c in info.signature.outputs.to_dict()]
    assert outputs == ["label", *[f"prob_{c}" for c in fit.classes], "error"]
    assert "image_b64" in json.loads((root / "input_example.json").read_text())["columns"]
    manifest = json.loads(next(root.rglob("ensemble.json")).read_text())
    assert [len(m["checkpoints"]) for m in manifest["members"]] == [2, 2]  # every fold of every member
    assert manifest["tta"] == "d4" and manifest["classes"] == fit.classes
    assert [m["weight"] for m in manifest["members"]] == [0.7, 0.3]
    assert len(list(root.rglob("member*_fold*.pt"))) == 4
    assert (root / "code" / "rockcls" / "runs" / "registry.py").is_file()  # the package travels with the model


LOAD_WITHOUT_INSTALLED_ROCKCLS = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]  # hide the editable install
import importlib.util
assert importlib.util.find_spec("rockcls") is None
import mlflow, pandas as pd
out = mlflow.pyfunc.load_model(sys.argv[1]).predict(pd.DataFrame({"img_path": sys.argv[2:]}))
import rockcls
print(rockcls.__file__)
print(",".join(out["label"]))
"""


def test_model_loads_with_only_the_registry_uri_and_its_own_code(registered, images, store) -> None:
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_INSTALLED_ROCKCLS, f"models:/{NAME}@champion",
                           *images[:2]], cwd=store, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # a checkout on it is rockcls too
    assert done.returncode == 0, done.stderr[-2000:]
    module_file, labels = done.stdout.strip().splitlines()[-2:]
    assert "/code/rockcls/" in module_file and str(Path(__file__).parents[1]) not in module_file
    local = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(pd.DataFrame({"img_path": images[:2]}))
    assert labels.split(",") == list(local["label"])


def test_pip_requirements_drop_local_version_suffixes(monkeypatch) -> None:
    installed = {"torch": "2.14.1+cu130", "torchvision": "0.29.1+cu130"}
    monkeypatch.setattr(registry.importlib.metadata, "version", lambda pkg: installed.get(pkg, "1.0"))
    reqs = registry.pip_requirements()
    assert reqs[:2] == ["torch==2.14.1", "torchvision==0.29.1"]
    assert len(reqs) == len(registry.SERVING_PACKAGES) and all("+" not in r for r in reqs)


def test_champion_alias_moves_only_on_improvement_or_force(registered) -> None:
    fit, _, reg = registered
    client = MlflowClient()
    source = client.get_model_version(NAME, reg.version).source

    def new_version(score: float | None) -> str:
        tags = {} if score is None else {names.SCORE: repr(score)}
        return str(mlflow.register_model(source, NAME, tags=tags).version)

    def champion() -> str:
        return str(client.get_model_version_by_alias(NAME, "champion").version)

    worse, tie, better = new_version(fit.score - 0.1), new_version(fit.score), new_version(fit.score + 0.1)
    assert registry.update_champion(NAME, worse, fit.score - 0.1) == (False, f"does not beat version 1 "
                                                                     f"({fit.score - 0.1:.4f} <= {fit.score:.4f})")
    assert not registry.update_champion(NAME, tie, fit.score)[0] and champion() == "1"
    moved, reason = registry.update_champion(NAME, better, fit.score + 0.1)
    assert moved and reason.startswith("beats version 1") and champion() == better
    moved, reason = registry.update_champion(NAME, worse, fit.score - 0.1, force=True)
    assert moved and reason == f"forced over version {better}" and champion() == worse
    unscored = new_version(None)
    client.set_registered_model_alias(NAME, "champion", unscored)
    moved, reason = registry.update_champion(NAME, better, fit.score + 0.1)
    assert not moved and "has no rockcls.macro_f1 tag" in reason and champion() == unscored
    for v in (worse, tie, better):  # every version keeps its score
        assert names.SCORE in client.get_model_version(NAME, v).tags
    client.set_registered_model_alias(NAME, "champion", "1")


def test_second_registration_of_a_worse_ensemble_leaves_the_champion(registered) -> None:
    fit, _, _ = registered
    worse = dataclasses.replace(fit, crossfit_score=fit.score - 0.2, weights=np.array([1.0, 0.0]))
    run_id = ensemble.log_ensemble(worse, experiment="rockcls")
    reg = registry.register_ensemble(worse, name=NAME, run_id=run_id)
    assert not reg.champion and reg.reason.startswith("does not beat version 1")
    assert str(MlflowClient().get_model_version_by_alias(NAME, "champion").version) == "1"
    root = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{reg.version}"))
    assert len(list(root.rglob("member*_fold*.pt"))) == 2  # a zero-weight member is not packed
    forced = registry.register_ensemble(worse, name=NAME, run_id=run_id, force=True)
    assert forced.champion
    assert str(MlflowClient().get_model_version_by_alias(NAME, "champion").version) == forced.version
    MlflowClient().set_registered_model_alias(NAME, "champion", "1")


def test_predict_command_with_a_registered_model_uses_its_tta(registered, images, store) -> None:
    fit, run_id, _ = registered
    pd.DataFrame({"ID": [f"r{i}" for i in range(len(images))], "img_path": images}).to_csv(store / "t.csv", index=False)
    assert predict.main(["--model", f"models:/{NAME}@champion", "--data", str(store / "t.csv"),
                         "--out", "reg.csv", "--num-workers", "0"]) == 0
    sub = pd.read_csv(store / "reg.csv")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert list(sub["rock_type"]) == list(model.predict(pd.DataFrame({"img_path": images}))["label"])
    with np.load(store / "reg_logits.npz") as z:
        assert str(z["tta"]) == "d4"
    assert predict.main(["--model", f"runs:/{run_id}", "--data", str(store / "t.csv"), "--out", "ens.csv",
                         "--num-workers", "0"]) == 0  # an ensemble run predicts with its logged model
    assert list(pd.read_csv(store / "ens.csv")["rock_type"]) == list(sub["rock_type"])


def test_unknown_registered_model_is_a_one_line_error(registered, images) -> None:
    with pytest.raises(registry_errors.RockclsError, match="model: cannot load models:/nope@champion"):
        predict.load_predictor("models:/nope@champion")
