"""Distillation: the loss, the teacher's fold-k probabilities and their cache, a distilled student
run end to end, the network fitted on every image and its registration with fewer views."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from rockcls.commands import distill as distill_cmd
from rockcls.commands import ensemble as ensemble_cmd
from rockcls.core import names, tracking
from rockcls.core.errors import ConfigError
from rockcls.core.metrics import softmax
from rockcls.data.sources import FileSource
from rockcls.inference.predictor import load_models, predict_logits
from rockcls.runs.lookup import download_run_checkpoints
from rockcls.training.distill import TeacherTargets, distillation_losses, load_teacher, save_teacher
from rockcls.training.trainer import run_training

from tests.conftest import tiny_config, use_store

TINY = ["--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--folds", "2", "--epochs", "1",
        "--batch-size", "16", "--num-workers", "0", "--device", "cpu", "--tta", "d4"]


def test_the_loss_mixes_hard_labels_and_the_softened_teacher() -> None:
    torch.manual_seed(0)
    logits, teacher = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3)
    hard = F.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1]), reduction="none")
    only_hard = distillation_losses(logits, hard, teacher, temperature=2.0, weight=0.0)
    torch.testing.assert_close(only_hard, hard)
    # a student that already matches the teacher pays nothing for the soft term
    same = distillation_losses(teacher.clone(), hard, teacher, temperature=3.0, weight=1.0)
    torch.testing.assert_close(same, torch.zeros(5), atol=1e-6, rtol=0)
    # the soft term is T^2 * KL(teacher_T || student_T), per sample
    t = 2.0
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                  reduction="none").sum(1)
    mixed = distillation_losses(logits, hard, teacher, temperature=t, weight=0.25)
    torch.testing.assert_close(mixed, 0.75 * hard + 0.25 * t * t * kl)
    mixed.sum().backward()  # the student gets gradients, the teacher is a constant
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_teacher_scores_take_fold_k_or_the_mean_of_the_folds(tmp_path) -> None:
    mix = np.stack([np.full((4, 2), [0.9, 0.1]), np.full((4, 2), [0.3, 0.7])])
    targets = TeacherTargets(np.asarray(["a", "b", "c", "d"]), np.asarray([0, 0, 1, 1]), mix, np.asarray([0.0, 0.5]),
                             ["x", "y"], {"teacher": "t", "split_fingerprint": "abc"})
    save_teacher(tmp_path / "t.npz", targets)
    back = load_teacher(tmp_path / "t.npz")
    np.testing.assert_allclose(back.scores(1)[0], np.log([0.3, 0.7]) + [0.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(back.scores(2)[0], np.log([0.6, 0.4]) + [0.0, 0.5], rtol=1e-6)  # the full network's
    reordered = back.aligned(np.asarray(["d", "a"]))
    assert list(reordered.ids) == ["d", "a"] and list(reordered.fold) == [1, 0]
    with pytest.raises(ConfigError, match="1 image\\(s\\) of the data have no teacher prediction \\(first 'zz'\\)"):
        back.aligned(np.asarray(["a", "zz"]))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="bad.npz is not a rockcls teacher file"):
        load_teacher(tmp_path / "bad.npz")


@pytest.fixture(scope="module")
def teacher_store(tmp_path_factory, synthetic_dir):
    """Two members (test_vit, test_efficientnet) on one 2-fold split, ensembled (equal weights kept)."""
    root = tmp_path_factory.mktemp("distill")
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root)
        runs = [run_training(tiny_config(synthetic_dir, backbone=b, epochs=1, tta="d4", seed=s)).run_id
                for b, s in (("test_vit", 1), ("test_efficientnet", 2))]
        assert ensemble_cmd.main(["--runs", ",".join(runs), "--no-bias"]) == 0
        ens = tracking.search_runs("", f"tags.`{names.KIND}` = 'ensemble'")[0].info.run_id
        yield {"root": root, "members": runs, "ensemble": ens, "data": str(synthetic_dir)}
    mlflow.set_tracking_uri(None)


@pytest.fixture
def in_store(teacher_store, monkeypatch):
    use_store(monkeypatch, teacher_store["root"])
    return teacher_store


def test_fold_k_of_the_student_learns_from_the_fold_k_networks_only(in_store, caplog) -> None:
    """Teacher = one train run: its cached mixture for fold k is the fold-k network's prediction of
    every image (in-sample for fold k's training rows, its own OOF logits for fold k's rows)."""
    member = in_store["members"][0]
    assert distill_cmd.main(["--teacher", member, "--data", in_store["data"], *TINY]) == 0
    student = tracking.search_runs("", f"tags.`{names.TEACHER}` = '{member}'")[0]
    assert student.data.params["teacher"] == member and student.data.tags[names.KIND] == "train"
    cached = [p for p in (Path(in_store["root"]) / "cache" / "teachers").glob("*.npz")]
    assert len(cached) == 1
    targets = load_teacher(cached[0])
    assert targets.meta["members"] == [member] and targets.meta["tta"] == "d4"
    logged = MlflowClient().list_artifacts(student.info.run_id, names.TEACHER_DIR)
    assert [Path(a.path).name for a in logged] == [cached[0].name]

    with np.load(tracking.download(member, names.OOF_LOGITS)) as z:
        oof, fold, paths = z["logits"], z["fold"], z["paths"]
    checkpoints = download_run_checkpoints(member, Path(in_store["root"]) / "check")
    for k in (0, 1):
        own = np.flatnonzero(fold == k)
        np.testing.assert_allclose(targets.mix[k, own], softmax(oof[own].astype(np.float64)), atol=1e-6)
        rows = np.flatnonzero(fold != k)[:6]
        logits, _ = predict_logits(load_models([checkpoints[k]]), FileSource(list(paths[rows])), tta="d4")
        np.testing.assert_allclose(targets.mix[k, rows], softmax(logits.astype(np.float64)), atol=1e-5)
        other = load_models([checkpoints[1 - k]])  # the network that saw fold k predicts otherwise
        wrong, _ = predict_logits(other, FileSource(list(paths[rows])), tta="d4")
        assert not np.allclose(targets.mix[k, rows], softmax(wrong.astype(np.float64)), atol=1e-5)

    # a second student of the same teacher reads the cache instead of predicting again
    stamp = cached[0].stat().st_mtime_ns
    caplog.set_level("INFO", logger="rockcls")
    assert distill_cmd.main(["--teacher", member, "--data", in_store["data"], *TINY, "--seed", "5"]) == 0
    assert cached[0].stat().st_mtime_ns == stamp
    assert any("cached probabilities" in r.getMessage() for r in caplog.records)


def test_an_interrupted_student_resumes_with_its_own_folds_and_teacher(in_store, caplog) -> None:
    """`distill --resume ID` alone: folds, split seed, data and teacher come from the run's config
    (the parser's defaults, 5 folds, would be refused by the teacher check)."""
    member = in_store["members"][1]
    assert distill_cmd.main(["--teacher", member, "--data", in_store["data"], *TINY, "--teacher-tta", "flip"]) == 0
    sid = tracking.search_runs("", f"tags.`{names.TEACHER}` = '{member}'")[0].info.run_id
    MlflowClient().set_terminated(sid, "FAILED")  # what a killed process leaves, as far as resume is concerned
    caplog.set_level("INFO", logger="rockcls")
    assert distill_cmd.main(["--resume", sid]) == 0
    run = tracking.get_run(sid)
    assert run.info.status == "FINISHED" and run.data.params["folds"] == "2"
    assert any("cached probabilities" in r.getMessage() for r in caplog.records)  # the flip teacher, not a d4 one
    assert len(tracking.child_runs(sid, kind="fold")) == 2


def test_a_teacher_on_another_split_is_refused_in_one_line(in_store) -> None:
    with pytest.raises(ConfigError, match="was trained with folds 2, split_seed 42; this run has folds 2, split_seed 7"):
        distill_cmd.main(["--teacher", in_store["ensemble"], "--data", in_store["data"], *TINY, "--split-seed", "7"])
    with pytest.raises(ConfigError, match="teacher: expected models:/NAME@alias"):
        distill_cmd.main(["--teacher", "not-a-run", "--data", in_store["data"], *TINY])
    with pytest.raises(ConfigError, match="teacher: distill needs --teacher"):
        distill_cmd.main(["--data", in_store["data"], *TINY])
    with pytest.raises(ConfigError, match="cannot find models:/nobody@champion"):
        distill_cmd.main(["--teacher", "models:/nobody@champion", "--data", in_store["data"], *TINY])


def test_distilled_student_with_a_full_network_registers_alone_and_serves(in_store, synthetic_dir, capsys) -> None:
    """The ensemble as teacher (by its registered name), a student that ends with one network on
    every image, registered alone with the views its OOF predictions justify, then loaded and used."""
    assert ensemble_cmd.main(["--runs", ",".join(in_store["members"]), "--no-bias", "--register", "teach"]) == 0
    assert distill_cmd.main(["--teacher", "models:/teach@champion", "--data", in_store["data"], *TINY,
                             "--full-fit", "--temperature", "3", "--distill-weight", "0.7"]) == 0
    student = tracking.search_runs("", f"tags.`{names.TEACHER}` = 'models:/teach@champion'")[0]
    sid = student.info.run_id
    assert (student.data.params["temperature"], student.data.params["distill_weight"]) == ("3.0", "0.7")
    note = student.data.tags[names.NOTE]
    assert "Distilled from `models:/teach@champion` (temperature 3, weight 0.7)" in note and "child run `full`" in note
    assert {f"cv_macro_f1.tta_{v}" for v in ("none", "flip", "d4")} <= set(student.data.metrics)
    full = tracking.child_runs(sid, kind="full")
    assert len(full) == 1 and full[0].data.tags[names.COMPLETE] == "true"
    assert len(tracking.child_runs(sid, kind="fold")) == 2

    capsys.readouterr()
    assert ensemble_cmd.main(["--runs", sid, "--no-bias", "--register", "student"]) == 0
    out = capsys.readouterr().out
    assert "by test-time views" in out and "full networks" in out
    version = MlflowClient().get_model_version("student", "1")
    assert version.tags[names.NETWORKS] == "full"
    chosen = version.tags[names.TTA]
    views = {v: student.data.metrics[f"cv_macro_f1.tta_{v}"] for v in ("none", "flip", "d4")}
    cheaper = [v for v in ("none", "flip", "d4") if views[v] >= max(views.values()) - 0.005]
    assert chosen == cheaper[0]
    root = Path(mlflow.artifacts.download_artifacts("models:/student/1"))
    manifest = json.loads(next(root.rglob(names.ENSEMBLE_FILE)).read_text())
    assert manifest["networks"] == "full" and manifest["members"][0]["checkpoints"] == ["member0_full"]
    assert [p.name for p in root.rglob("member*.pt")] == ["member0_full.pt"]

    model = mlflow.pyfunc.load_model("models:/student@champion")
    images = sorted(str(p) for p in Path(synthetic_dir).rglob("*.png"))[:4]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROCKCLS_IMAGE_ROOT", str(synthetic_dir))
        model = mlflow.pyfunc.load_model("models:/student@champion")
        got = model.predict(pd.DataFrame({"img_path": images}))
    assert list(got["error"]) == [""] * 4 and got.filter(like="prob_").sum(axis=1).round(5).eq(1).all()
    assert len(model.unwrap_python_model().predictor.models) == 1  # one network, not one per fold
