import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from rockcls.core import tracking
from rockcls.core.errors import ConfigError, DataError, RockclsError
from rockcls.data.synthetic import make_dataset
from rockcls.training import checkpoint
from rockcls.training import fold as train_mod
from rockcls.training.checkpoint import load_checkpoint
from rockcls.training.models import build_model_from_spec
from rockcls.training.trainer import run_training
from tests.conftest import tiny_config

EPOCH_METRICS = ("train_loss", "val_loss", "val_macro_f1", "lr")


def fold_runs(client: MlflowClient, parent) -> dict[int, object]:
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {int(r.data.tags["rockcls.fold"]): r for r in runs}


def test_two_fold_run_is_fully_tracked(two_fold_run, tmp_path):
    result = two_fold_run.result  # epochs 2, hn_ratio 0.25 (tests/conftest.py)
    client = MlflowClient(two_fold_run.uri)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["rockcls.kind"] == "train"
    assert parent.data.params["backbone"] == "test_efficientnet"
    assert parent.data.params["effective_batch_size"] == "16"
    assert parent.data.params["hard_negatives_per_step"] == "4"
    assert {"lr", "hn_ratio", "hn_memory", "balanced_ratio", "augment", "seed"} <= set(parent.data.params)
    assert parent.data.metrics["cv_macro_f1"] == pytest.approx(result.cv_macro_f1)
    assert {f"cv_f1.{c}" for c in result.classes} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "split.csv", "classes.json", "oof_logits.npz", "confusion_matrix.png"} <= artifacts

    oof = np.load(client.download_artifacts(result.run_id, "oof_logits.npz", str(tmp_path)))
    assert oof["logits"].shape == (72, 3) and np.isfinite(oof["logits"]).all()
    assert sorted(set(oof["fold"].tolist())) == [0, 1]
    assert list(oof["classes"]) == result.classes

    folds = fold_runs(client, parent)
    assert sorted(folds) == [0, 1]
    for k, run in folds.items():
        assert run.data.tags["rockcls.kind"] == "fold" and run.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1]
        assert run.data.metrics["hn_memory_size"] > 0  # the hard-negative memory was filled
        assert "checkpoints/model.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}


def test_best_checkpoint_rebuilds_the_model_alone(mlflow_store, synthetic_dir, tmp_path):
    result = run_training(tiny_config(synthetic_dir, folds=1, epochs=1, hn_ratio=0.0, balanced_ratio=0.0))
    client = MlflowClient()
    fold_run = fold_runs(client, client.get_run(result.run_id))[0]
    ck = load_checkpoint(client.download_artifacts(fold_run.info.run_id, "checkpoints/model.pt", str(tmp_path)))
    model = build_model_from_spec(ck["spec"])
    model.load_state_dict(ck["model"])
    assert ck["classes"] == result.classes and ck["spec"]["img_size"] == 32
    out = model.eval()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    # folds=1: the holdout is scored, the rest is train-only (NaN logits, fold -1)
    holdout = result.fold_of == 0
    assert 0 < holdout.sum() < len(holdout)
    assert np.isnan(result.oof_logits[~holdout]).all() and np.isfinite(result.oof_logits[holdout]).all()


def test_the_split_follows_split_seed_not_the_training_seed(split_runs):
    a, b, other = split_runs.results  # 2 folds: a; b with lr 1e-3 and seed 7; other with split_seed 7
    c = MlflowClient(split_runs.uri)
    tag = "rockcls.split_fingerprint"
    assert c.get_run(a.run_id).data.tags[tag] == c.get_run(b.run_id).data.tags[tag]
    np.testing.assert_array_equal(a.fold_of, b.fold_of)
    assert not np.array_equal(a.oof_logits, b.oof_logits)  # another seed trained another model
    assert c.get_run(other.run_id).data.tags[tag] != c.get_run(a.run_id).data.tags[tag]


@pytest.mark.parametrize("select", ["last", "best"])
def test_a_fold_keeps_the_last_epoch_or_the_best_when_asked(mlflow_store, synthetic_dir, tmp_path, select):
    result = run_training(tiny_config(synthetic_dir, folds=1, epochs=3, select=select, hn_ratio=0.0))
    client = MlflowClient()
    fold = fold_runs(client, client.get_run(result.run_id))[0]
    history = client.get_metric_history(fold.info.run_id, "val_macro_f1")
    best_epoch = max(history, key=lambda m: (m.value, -m.step)).step
    kept = int(fold.data.metrics["kept_epoch"])
    assert kept == (2 if select == "last" else best_epoch)
    ck = load_checkpoint(client.download_artifacts(fold.info.run_id, "checkpoints/model.pt", str(tmp_path)))
    assert ck["epoch"] == kept
    # the OOF score is the kept weights' score on the fold (tta none: the per-epoch number)
    assert fold.data.metrics["oof_macro_f1"] == pytest.approx(next(m.value for m in history if m.step == kept))
    assert list(Path(mlflow_store.removeprefix("sqlite:///")).parent.glob("outputs/*/fold_0/*")) == []


def test_oof_predictions_use_the_requested_views_and_predict_uses_them_too(mlflow_store, synthetic_dir):
    from rockcls.data.sources import FileSource
    from rockcls.inference.predictor import predict_logits
    from rockcls.runs.lookup import load_run_predictor

    result = run_training(tiny_config(synthetic_dir, folds=2, epochs=1, tta="d4", cache=False, hn_ratio=0.0))
    predictor = load_run_predictor(result.run_id)
    assert predictor.tta == "d4"  # predict's tta=auto follows the run
    paths = [str(synthetic_dir / i) for i in result.ids]
    for k, model in enumerate(predictor.models):
        rows = np.flatnonzero(result.fold_of == k)
        logits, errors = predict_logits([model], FileSource([paths[i] for i in rows]), tta="d4")
        assert not any(errors)
        np.testing.assert_allclose(logits, result.oof_logits[rows], atol=1e-4)


def test_corrupt_image_is_named_and_skippable(mlflow_store, tmp_path, caplog):
    data = make_dataset(tmp_path / "data", [12, 12], size=36)
    bad = data / "synthetic_banded" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "synthetic_grainy" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 bad images; first: .*broken.png"):
        run_training(tiny_config(data, epochs=1))
    result = run_training(tiny_config(data, epochs=1, skip_bad_images=True))
    assert "skipping 2 bad image" in caplog.text
    client = MlflowClient()
    listed = Path(client.download_artifacts(result.run_id, "skipped_images.tsv", str(tmp_path))).read_text()
    assert "broken.png" in listed and "empty.jpg" in listed
    assert client.get_run(result.run_id).data.params["num_skipped"] == "2"


def test_unknown_backbone_is_a_clear_error(mlflow_store, synthetic_dir):
    with pytest.raises(ConfigError, match="backbone: unknown timm model 'davit_bass'"):
        run_training(tiny_config(synthetic_dir, backbone="davit_bass"))


def _wait_for(path_glob: str, root: Path, proc: subprocess.Popen, timeout: float = 240) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        hits = list(root.glob(path_glob))
        if hits:
            return hits[0]
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {path_glob} appeared:\n{proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError(f"{path_glob} did not appear in {timeout}s")


def test_resume_after_kill_trains_nothing_twice(mlflow_store, synthetic_dir, tmp_path):
    args = ["--data", str(synthetic_dir), "--backbone", "test_efficientnet", "--pretrained", "false",
            "--img-size", "32", "--folds", "2", "--epochs", "4", "--batch-size", "16", "--num-workers", "0",
            "--hn-memory", "64", "--device", "cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rockcls", "train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        last = _wait_for("outputs/*/fold_1/last.pt", tmp_path, proc)  # fold 0 done, fold 1 under way
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run_id = last.parent.parent.name
    client = MlflowClient()
    assert client.get_run(run_id).info.status == "RUNNING"  # a killed process cannot close its run

    done = subprocess.run([sys.executable, "-m", "rockcls", "train", "--resume", run_id], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "fold 0 already finished" in done.stderr
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED" and "cv_macro_f1" in parent.data.metrics
    folds = fold_runs(client, parent)
    assert sorted(folds) == [0, 1]  # the unfinished fold continued in its own run
    for run in folds.values():
        assert run.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2, 3]
        assert client.list_artifacts(run.info.run_id, "checkpoints")


def test_kill_between_best_and_last_checkpoint_resumes_with_the_pair_last_pt_names(mlflow_store, synthetic_dir,
                                                                                 tmp_path, monkeypatch):
    # Epoch 1 first looks like a new best (best-1.pt is written), then the process dies before last.pt;
    # rerun after resume, the same epoch scores lower, so the weights kept must be epoch 0's.
    scores = iter([0.5, 0.6, 0.4])
    monkeypatch.setattr(train_mod, "macro_f1", lambda *a: next(scores, 0.3))
    real_save = train_mod.save_checkpoint

    def killed_before_last(payload, path):
        if Path(path).name == "last.pt" and (Path(path).parent / "best-1.pt").exists():
            raise KeyboardInterrupt  # what the run sees of a kill at this point
        return real_save(payload, path)
    monkeypatch.setattr(train_mod, "save_checkpoint", killed_before_last)
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config(synthetic_dir, folds=1, epochs=2, select="best"))
    fold_dir = next((tmp_path / "outputs").glob("*/fold_0"))
    assert sorted(p.name for p in fold_dir.iterdir()) == ["best-0.pt", "best-1.pt", "last.pt"]
    assert load_checkpoint(fold_dir / "last.pt")["state"]["best_epoch"] == 0  # names a file that exists

    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    result = run_training(tiny_config(synthetic_dir, resume=fold_dir.parent.name))
    (fold,) = tracking.child_runs(result.run_id, kind="fold")
    kept = load_checkpoint(tracking.download(fold.info.run_id, "checkpoints/model.pt", str(tmp_path / "dl")))
    assert kept["epoch"] == 0 and fold.data.metrics["kept_epoch"] == 0


def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_no_temp_file(mlflow_store, synthetic_dir,
                                                                               tmp_path, monkeypatch):
    real_save = checkpoint.torch.save
    calls = []

    def full_disk(payload, fh):
        calls.append(1)
        if len(calls) == 2:  # the second epoch's last.pt
            fh.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(payload, fh)
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(RockclsError, match=r"checkpoint: cannot write .*last\.pt \(No space left on device\); "
                                           r"the previous checkpoint is kept"):
        run_training(tiny_config(synthetic_dir, folds=1, epochs=2))
    fold_dir = next((tmp_path / "outputs").glob("*/fold_0"))
    assert [p.name for p in fold_dir.iterdir()] == ["last.pt"]
    assert load_checkpoint(fold_dir / "last.pt")["state"]["epoch"] == 1

    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    result = run_training(tiny_config(synthetic_dir, resume=fold_dir.parent.name))
    assert result.run_id == fold_dir.parent.name and np.isfinite(result.cv_macro_f1)


def test_failed_npz_write_leaves_neither_file_nor_temp_file(tmp_path, monkeypatch):
    def full_disk(fh, **arrays):
        fh.write(b"half an archive")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(RockclsError, match=r"cannot write .*oof_fold\.npz \(No space left on device\)"):
        checkpoint.write_npz_atomic(tmp_path / "oof_fold.npz", rows=np.arange(3))
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_a_finished_run(mlflow_store, synthetic_dir):
    from rockcls.core.errors import RockclsError

    result = run_training(tiny_config(synthetic_dir, folds=1, epochs=1))
    with pytest.raises(RockclsError, match="already finished"):
        run_training(tiny_config(synthetic_dir, resume=result.run_id))


def test_ema_accumulation_and_early_stopping(mlflow_store, synthetic_dir):
    cfg = tiny_config(synthetic_dir, folds=1, epochs=6, ema=0.9, accumulation_steps=2, batch_size=8,
                      early_stop=1, lr=1e-6, optimizer="adam", augment="winner")
    result = run_training(cfg)
    client = MlflowClient()
    parent = client.get_run(result.run_id)
    assert parent.data.params["effective_batch_size"] == "16"
    fold = fold_runs(client, parent)[0]
    steps = [m.step for m in client.get_metric_history(fold.info.run_id, "val_macro_f1")]
    # at lr 1e-6 macro-F1 cannot keep improving: patience 1 stops the fold before epoch 6
    assert 2 <= len(steps) < 6 and steps == list(range(len(steps)))


def test_layer_decay_scales_each_group_and_grad_checkpoint_trains_the_same_recipe(mlflow_store, synthetic_dir):
    """layer_decay: timm's layer groups, each stepped at lr x its lr_scale (the engine keeps the
    scale); grad_checkpoint: activations recomputed, the run otherwise as usual."""
    from rockcls.training.engine import StepSettings, _optimizer_step
    from rockcls.training.models import build_model

    cfg = tiny_config(synthetic_dir, backbone="test_vit", lr=1e-3, layer_decay=0.5)
    model = build_model("test_vit", 3)
    optimizer = train_mod.build_optimizer(model, cfg)
    scales = sorted({g["lr_scale"] for g in optimizer.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0 and scales[0] == pytest.approx(0.5 ** (len(scales) - 1))
    _optimizer_step(model, optimizer, StepSettings(device=torch.device("cpu"), mean=(0.5,) * 3, std=(0.5,) * 3),
                    None, 1e-3)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([1e-3 * s for s in scales])

    result = run_training(tiny_config(synthetic_dir, backbone="test_vit", layer_decay=0.8, grad_checkpoint=True,
                                      epochs=1))
    params = MlflowClient().get_run(result.run_id).data.params
    assert (params["layer_decay"], params["grad_checkpoint"]) == ("0.8", "True")
    assert np.isfinite(result.oof_logits).all()
    with pytest.raises(ConfigError, match="grad_checkpoint: inception_v3 does not support"):
        run_training(tiny_config(synthetic_dir, backbone="inception_v3", grad_checkpoint=True))  # before any run
