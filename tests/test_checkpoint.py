"""Damaged and forged checkpoints: a pickle payload, a spec or head claiming 10**11 classes, weights
that do not fit. Every path that loads one (predict, a registered model, a teacher, resume) ends in
one line naming the file, runs nothing and allocates nothing of what the file claims."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from rockcls.commands import distill as distill_cmd
from rockcls.commands import predict as predict_cmd
from rockcls.core import names
from rockcls.core.entry import run_command
from rockcls.core.errors import RockclsError
from rockcls.inference.predictor import load_models
from rockcls.runs import ensemble, registry
from rockcls.training import fold as train_mod
from rockcls.training.checkpoint import load_checkpoint, save_checkpoint
from rockcls.training import models
from rockcls.training.models import build_model, model_spec
from rockcls.training.trainer import run_training
from tests.conftest import tiny_config, use_store

HUGE = 10**11


class Payload:
    """What a tampered checkpoint would hold: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_payload(path: Path) -> Path:
    torch.save({"model": Payload(path.with_suffix(".ran"))}, path)
    return path


def real_checkpoint(path: Path, classes=("a", "b", "c")) -> dict:
    model = build_model("test_efficientnet", len(classes))
    ck = {"model": model.state_dict(), "spec": model_spec(model, "test_efficientnet", list(classes), 32, "seed")}
    save_checkpoint(ck, path)
    return ck


def head_key(ck: dict) -> str:
    return next(k for k, t in ck["model"].items() if t.dim() == 2 and t.shape[0] == ck["spec"]["num_classes"])


def assert_one_line(exc: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    text = str(exc.value)
    assert "\n" not in text and str(path) in text and "weights_only" not in text, text
    for word in words:
        assert word in text, text


def test_a_pickle_payload_is_refused_without_running_and_without_suggesting_weights_only_false(tmp_path):
    path = write_payload(tmp_path / "model.pt")
    with pytest.raises(RockclsError) as exc:
        load_checkpoint(path)
    assert_one_line(exc, path, "refused", "posix.system")
    assert not path.with_suffix(".ran").exists()


def test_a_spec_claiming_10_to_the_11_classes_is_refused_before_building(tmp_path):
    ck = real_checkpoint(tmp_path / "model.pt")
    ck["spec"]["num_classes"] = HUGE
    torch.save(ck, tmp_path / "model.pt")
    with pytest.raises(RockclsError) as exc:
        load_models([tmp_path / "model.pt"])
    assert_one_line(exc, tmp_path / "model.pt", f"invalid num_classes ({HUGE} for 3 class names)")


def test_a_head_of_10_to_the_11_rows_on_a_tiny_storage_is_refused(tmp_path):
    ck = real_checkpoint(tmp_path / "model.pt")
    key = head_key(ck)
    ck["model"][key] = torch.zeros(1).as_strided((HUGE, ck["model"][key].shape[1]), (0, 0))
    torch.save(ck, tmp_path / "model.pt")
    assert (tmp_path / "model.pt").stat().st_size < 10**7
    with pytest.raises(RockclsError) as exc:
        load_models([tmp_path / "model.pt"])
    assert_one_line(exc, tmp_path / "model.pt", "is damaged", f"model.{key} claims shape ({HUGE},")


def test_a_spec_and_head_that_agree_on_a_huge_class_count_are_matched_before_the_model_is_built(
        tmp_path, monkeypatch):
    ck = real_checkpoint(tmp_path / "model.pt")
    ck["spec"]["classes"] = [f"c{k}" for k in range(10**5)]
    ck["spec"]["num_classes"] = 10**5  # the weights still hold 3 rows
    torch.save(ck, tmp_path / "model.pt")
    built = []
    monkeypatch.setattr("rockcls.inference.predictor.build_model_from_spec",
                        lambda spec, real=models.build_model_from_spec: built.append(torch.empty(0).device)
                        or real(spec))
    with pytest.raises(RockclsError) as exc:
        load_models([tmp_path / "model.pt"])
    assert_one_line(exc, tmp_path / "model.pt", "weights do not match its spec", "is 3 in the file, 100000 in the model")
    assert [d.type for d in built] == ["meta"]  # only the free model was built


def test_a_torn_file_and_a_foreign_pickle_are_one_line_errors(tmp_path):
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 half a checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(RockclsError) as exc:
        load_checkpoint(tmp_path / "torn.pt")
    assert_one_line(exc, tmp_path / "torn.pt", "cannot be read")
    with pytest.raises(RockclsError) as exc:
        load_checkpoint(tmp_path / "list.pt")
    assert_one_line(exc, tmp_path / "list.pt", "holds a list")


# ---- every command that loads one ------------------------------------------------------------


@pytest.fixture(scope="module")
def tampered(tmp_path_factory, synthetic_dir):
    """A train run and its registered ensemble, then the first fold's model.pt replaced by a payload
    in the run's artifacts and in the registered model's."""
    root = tmp_path_factory.mktemp("tampered")
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root)
        run = run_training(tiny_config(synthetic_dir, epochs=1))
        fit = ensemble.fit_ensemble(ensemble.load_members([run.run_id]), bias=False)
        registry.register_ensemble(fit, name="tampered", run_id=ensemble.log_ensemble(fit, experiment="rockcls"),
                                   tta="none")
        files = [p for p in root.rglob("*.pt") if p.name in ("model.pt", "member0_fold0.pt")]
        for path in files:
            write_payload(path)
        yield {"root": root, "run": run.run_id, "files": files}
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("command, args", [
    (predict_cmd.main, ["--model", "RUN"]),
    (predict_cmd.main, ["--model", "models:/tampered@champion"]),
    (distill_cmd.main, ["--teacher", "RUN", "--backbone", "test_efficientnet", "--pretrained", "false",
                        "--img-size", "32", "--folds", "2", "--epochs", "1", "--device", "cpu", "--num-workers", "0"]),
])
def test_predict_a_registered_model_and_a_teacher_end_in_one_line_naming_the_file(
        tampered, synthetic_dir, tmp_path, monkeypatch, capsys, command, args):
    use_store(monkeypatch, tampered["root"])
    args = [a.replace("RUN", tampered["run"]) for a in args]
    rc = run_command(command, [*args, "--data", str(synthetic_dir), *(["--out", str(tmp_path / "o.csv")]
                                                                      if command is predict_cmd.main else [])])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("rockcls: error: checkpoint ") and "\n" not in err, err
    assert ".pt refused: it holds posix.system" in err and "weights_only" not in err
    assert not any(p.with_suffix(".ran").exists() for p in tampered["files"])


def test_resume_from_a_damaged_last_pt_names_it_and_keeps_it(mlflow_store, synthetic_dir, tmp_path, monkeypatch):
    real_save = train_mod.save_checkpoint
    saved = []

    def killed_at_the_second_epoch(payload, path):
        saved.append(Path(path).name)
        if saved.count("last.pt") == 2:
            raise KeyboardInterrupt
        return real_save(payload, path)
    monkeypatch.setattr(train_mod, "save_checkpoint", killed_at_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config(synthetic_dir, folds=1, epochs=2))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    last = next(Path("outputs").glob("*/fold_0/last.pt"))  # the message names it as train does: relative
    ck = load_checkpoint(last)
    key = next(k for k, t in ck["model"].items() if t.dim() == 2 and t.shape[0] == 3)
    ck["model"][key] = ck["model"][key][:2]  # a whole file whose head lost a class
    torch.save(ck, last)
    with pytest.raises(RockclsError) as exc:
        run_training(tiny_config(synthetic_dir, resume=last.parent.parent.name))
    assert_one_line(exc, last, "its model state does not fit", f"size mismatch for {key}")
    assert last.is_file()
    write_payload(last)
    with pytest.raises(RockclsError) as exc:
        run_training(tiny_config(synthetic_dir, resume=last.parent.parent.name))
    assert_one_line(exc, last, "refused")
    run_id = last.parent.parent.name
    assert "refused" in MlflowClient().get_run(run_id).data.tags[names.FAIL_REASON]
    last.unlink()  # moved aside, as the message says: the fold trains again from its first epoch
    run_training(tiny_config(synthetic_dir, resume=run_id))
    finished = MlflowClient().get_run(run_id)
    assert finished.info.status == "FINISHED" and names.FAIL_REASON not in finished.data.tags
