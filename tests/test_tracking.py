"""What a user finds in MLflow: one experiment per workflow, and runs, models and registry entries
that say what they are (names, descriptions, dataset inputs, user and source tags)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from rockcls.commands import ensemble as ensemble_cmd
from rockcls.commands import predict
from rockcls.core import downloads, experiments, names, store, tracking
from rockcls.core.errors import ConfigError, RockclsError
from rockcls.runs import ensemble
from rockcls.training.trainer import run_training
from tests.conftest import tiny_config

NAME = "rockcls-ui"


# ---------------------------------------------------------------------------- the experiment rule

def test_experiment_is_the_option_else_rockcls(mlflow_store) -> None:
    client = MlflowClient()
    assert client.get_experiment(experiments.experiment_id("")).name == "rockcls"
    assert client.get_experiment(experiments.experiment_id("mine")).name == "mine"
    assert names.NOTE in client.get_experiment_by_name("mine").tags  # described when rockcls creates it


def test_experiment_chosen_by_mlflow_run_wins_and_a_conflicting_option_is_refused(mlflow_store, monkeypatch) -> None:
    chosen = MlflowClient().create_experiment("picked-by-mlflow-run")
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", chosen)
    assert experiments.experiment_id("") == chosen
    assert experiments.experiment_id("picked-by-mlflow-run") == chosen
    with pytest.raises(ConfigError, match=r"experiment: 'rockcls' cannot take effect: `mlflow run` chose experiment "
                                          r"'picked-by-mlflow-run'; give `--experiment-name rockcls` to mlflow run"):
        experiments.experiment_id("rockcls")


def test_experiment_made_by_mlflow_run_gets_a_description_but_default_is_left_alone(mlflow_store, monkeypatch) -> None:
    client = MlflowClient()
    named = client.create_experiment("made-by-mlflow-run")
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    for exp_id in (named, "0"):
        monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp_id)
        assert experiments.experiment_id("") == exp_id
    assert client.get_experiment(named).tags[names.NOTE] == experiments.EXPERIMENT_NOTE
    assert names.NOTE not in client.get_experiment("0").tags


def test_mlflow_experiment_name_variable_wins_over_the_default(mlflow_store, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert MlflowClient().get_experiment(experiments.experiment_id("")).name == "from-env"
    with pytest.raises(ConfigError, match="unset MLFLOW_EXPERIMENT_NAME or leave experiment empty"):
        experiments.experiment_id("other")


def test_searching_a_missing_experiment_does_not_create_it(mlflow_store) -> None:
    with pytest.raises(RockclsError, match="experiment 'nowhere' not found"):
        ensemble.top_runs("nowhere", 2)
    assert MlflowClient().get_experiment_by_name("nowhere") is None
    experiments.experiment_id("")
    with pytest.raises(RockclsError, match="experiment 'rockcls' has no completed train run"):
        ensemble.top_runs("", 2)  # the error names the experiment searched, not the empty option


def test_params_mlflow_run_logged_empty_are_resolved_without_a_conflict(mlflow_store) -> None:
    run_id = tracking.start_run(experiment="", name="t", kind="train")
    MlflowClient().log_param(run_id, "lr", "''")  # how `mlflow run` logs a parameter left empty
    MlflowClient().log_param(run_id, "epochs", "9")
    assert tracking.log_params(run_id, {"lr": 0.002, "epochs": 4}) == ["epochs"]  # only a real conflict
    params = tracking.get_run(run_id).data.params
    assert (params["lr"], params["resolved.lr"], params["resolved.epochs"]) == ("''", "0.002", "4")


# ---------------------------------------------------------------------------- what the UI shows

@pytest.fixture(scope="module")
def workflow(store, synthetic_dir):
    """Two train runs, their registered ensemble and a prediction by alias, as a user runs them."""
    tracking.set_program("rockcls test")
    a = run_training(tiny_config(synthetic_dir, epochs=1))
    b = run_training(tiny_config(synthetic_dir, epochs=1, lr=1e-3, backbone="test_vit"))
    assert ensemble_cmd.main(["--runs", f"{a.run_id},{b.run_id}", "--register", NAME]) == 0
    images = sorted(synthetic_dir.rglob("*.png"))[::12]
    pd.DataFrame({"img_path": [str(p) for p in images]}).to_csv(store / "ui.csv", index=False)
    assert predict.main(["--model", f"models:/{NAME}@champion", "--data", str(store / "ui.csv"),
                         "--out", str(store / "ui_out.csv"), "--num-workers", "0"]) == 0
    client = MlflowClient()
    exp = client.get_experiment_by_name("rockcls")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    yield {"client": client, "exp": exp, "runs": runs, "train": [a, b], "data": str(synthetic_dir.resolve())}
    tracking.set_program("")


def runs_of(workflow, kind: str) -> list:
    return [r for r in workflow["runs"] if r.data.tags["rockcls.kind"] == kind]


def test_every_run_and_the_logged_model_are_in_one_experiment(workflow) -> None:
    client, exp = workflow["client"], workflow["exp"]
    assert sorted(r.data.tags["rockcls.kind"] for r in workflow["runs"]) == sorted(
        ["train", "train", "fold", "fold", "fold", "fold", "ensemble", "predict"])
    default = client.get_experiment_by_name("Default")
    assert client.search_runs([default.experiment_id]) == []
    assert client.search_logged_models([default.experiment_id]) == []
    assert names.NOTE in exp.tags


def test_runs_carry_user_and_source_tags(workflow) -> None:
    for run in workflow["runs"]:
        tags = run.data.tags
        assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL", run.info.run_name
        assert tags["mlflow.source.name"] == "rockcls test"


def test_train_run_description_has_its_score_and_the_command_that_repeats_it(workflow) -> None:
    for run in runs_of(workflow, "train"):
        note = run.data.tags[names.NOTE]
        assert f"**cv_macro_f1 {run.data.metrics['cv_macro_f1']:.4f}**" in note
        assert f"python -m rockcls train --data {workflow['data']} --backbone {run.data.params['backbone']} " in note
        assert "--no-pretrained" in note and "--img-size 32" in note
    for run in runs_of(workflow, "fold"):
        assert "OOF macro-F1" in run.data.tags[names.NOTE]


def test_train_and_fold_runs_have_the_dataset_as_input(workflow) -> None:
    for run in runs_of(workflow, "train") + runs_of(workflow, "fold"):
        (entry,) = run.inputs.dataset_inputs
        assert entry.dataset.name.endswith("/train") and entry.dataset.source_type == "local"
        assert workflow["data"] in entry.dataset.source
        assert {t.key: t.value for t in entry.tags}["mlflow.data.context"] == "training"
    digests = {r.inputs.dataset_inputs[0].dataset.digest for r in runs_of(workflow, "train") + runs_of(workflow, "fold")}
    assert digests == {runs_of(workflow, "train")[0].data.tags["rockcls.data_fingerprint"]}


def test_ensemble_run_is_named_by_its_members_and_logs_its_model_in_its_experiment(workflow) -> None:
    client, exp = workflow["client"], workflow["exp"]
    (run,) = runs_of(workflow, "ensemble")
    assert re.fullmatch(r"ensemble-2-[0-9a-f]{6}", run.info.run_name)
    note = run.data.tags[names.NOTE]
    assert f"**Honest macro-F1 {run.data.metrics['ensemble_macro_f1']:.4f}**" in note
    assert "python -m rockcls ensemble --runs" in note and f"registered as `{NAME}` version 1" in note
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == [
        runs_of(workflow, "train")[0].inputs.dataset_inputs[0].dataset.name]
    (model,) = client.search_logged_models([exp.experiment_id])
    assert model.name == run.info.run_name and model.source_run_id == run.info.run_id
    assert model.tags["mlflow.source.name"] == "rockcls test"  # the Models tab's "Logged from"
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    version = client.get_model_version(NAME, "1")
    assert version.source == f"models:/{model.model_id}"  # the version's "Source model" link
    assert "Honest macro-F1" in version.description and "@champion" in version.description
    assert f"models:/{NAME}@champion" in client.get_registered_model(NAME).description


def test_predict_run_describes_its_input_and_model(workflow) -> None:
    (run,) = runs_of(workflow, "predict")
    note = run.data.tags[names.NOTE]
    assert note.startswith("**Predictions** of") and f"models:/{NAME}@champion" in note
    (entry,) = run.inputs.dataset_inputs
    assert {t.key: t.value for t in entry.tags}["mlflow.data.context"] == "inference"


def test_different_ensembles_of_the_same_runs_get_different_names(workflow) -> None:
    members = ensemble.load_members([r.run_id for r in workflow["train"]])
    fit = ensemble.fit_ensemble(members, bias=True)
    first, second = (dataclasses.replace(fit, weights=np.array(w)) for w in ([0.7, 0.3], [0.3, 0.7]))
    assert first.name != second.name
    assert fit.name == ensemble.fit_ensemble(members, bias=True).name  # the same ensemble: the same name


def test_browse_hint_names_the_real_store_with_its_password_masked(mlflow_store) -> None:
    import mlflow

    assert store.browse_hint() == f"mlflow ui --backend-store-uri {mlflow_store}"
    mlflow.set_tracking_uri("http://ann:s3cret@tracking.example:5000")
    assert store.browse_hint() == "open http://ann:***@tracking.example:5000"
    mlflow.set_tracking_uri("postgresql+psycopg2://ann:s3cret@db:5432/mlflow")
    assert store.browse_hint() == "mlflow ui --backend-store-uri postgresql+psycopg2://ann:***@db:5432/mlflow"


# ---------------------------------------------------------------------------- downloads

DOWNLOADS = """
import sys
from rockcls.core import tracking
run = tracking.start_run(experiment="", name="dl", kind="train")
tracking.log_text(run, "x", "a/config.yaml")
paths = [tracking.download(run, "a/config.yaml") for _ in range(3)]
assert len(set(paths)) == 3 and all(p.read_text() == "x" for p in paths)
print(paths[0].parents[1])
"""


def test_downloads_leave_no_folder_after_the_process_and_a_killed_process_folder_goes_next_time(
        mlflow_store, tmp_path) -> None:
    import os
    import subprocess
    import sys

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    orphan = tmp / f"{downloads.DOWNLOADS_PREFIX}{dead}-abc"  # a process killed with -9 left it
    (orphan / "x").mkdir(parents=True)
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.run([sys.executable, "-c", DOWNLOADS], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(tmp / downloads.DOWNLOADS_PREFIX))
    assert list(tmp.iterdir()) == []


# ---------------------------------------------------------------------------- a PostgreSQL tracking store

def test_a_missing_database_driver_is_one_line_naming_the_package(mlflow_store, synthetic_dir, monkeypatch,
                                                                   capsys) -> None:
    import sys

    from rockcls.commands import train as train_cmd
    from rockcls.core.entry import run_command

    monkeypatch.setitem(sys.modules, "psycopg", None)  # what an environment without it gives
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://ann:s3cret@127.0.0.1:9/mlflow")
    tracking.mlflow.set_tracking_uri("postgresql://ann:s3cret@127.0.0.1:9/mlflow")
    store.check_driver.cache_clear()
    rc = run_command(train_cmd.main, ["--data", str(synthetic_dir), "--backbone", "test_efficientnet",
                                      "--pretrained", "false", "--img-size", "32", "--device", "cpu"])
    store.check_driver.cache_clear()
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "s3cret" not in err, err
    assert err == ("rockcls: error: tracking store postgresql://ann:***@127.0.0.1:9/mlflow: its database driver "
                   "'psycopg' is not installed (pip install 'psycopg[binary]')")


def test_train_and_predict_with_a_postgresql_tracking_store(mlflow_store, synthetic_dir, tmp_path, monkeypatch) -> None:
    """MLFLOW_TRACKING_URI=postgresql://... as written in the docs (no +driver): the install brings
    the driver MLflow 3 uses for it."""
    from tests import postgres

    reason = postgres.unavailable_reason()
    if reason:
        pytest.skip(f"PostgreSQL test skipped: {reason}")
    cluster = postgres.start_cluster()
    try:
        cluster.create_database("mlflow")
        uri = cluster.url("mlflow", driver="postgresql")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        tracking.mlflow.set_tracking_uri(uri)
        result = run_training(tiny_config(synthetic_dir, folds=2, epochs=1))
        run = tracking.get_run(result.run_id)
        assert run.info.status == "FINISHED" and "cv_macro_f1" in run.data.metrics
        assert len(tracking.child_runs(result.run_id, kind="fold")) == 2
        assert predict.main(["--model", result.run_id, "--data", str(synthetic_dir), "--out", str(tmp_path / "s.csv"),
                             "--num-workers", "0"]) == 0
        assert len(pd.read_csv(tmp_path / "s.csv")) == sum(1 for _ in synthetic_dir.rglob("*.png"))
    finally:
        tracking.mlflow.set_tracking_uri(None)
        cluster.stop()


def test_a_param_given_as_another_spelling_of_the_same_value_is_no_conflict():
    """`mlflow run` logs -P values as typed: "false" for a switch the run resolves to 0/False."""
    assert tracking.same_value("true", "1") and tracking.same_value("False", "0") and tracking.same_value("no", "false")
    assert tracking.same_value("1e-3", "0.001") and tracking.same_value(" d4", "d4")
    assert not tracking.same_value("true", "0") and not tracking.same_value("false", "1")
    assert not tracking.same_value("0.1", "0.2") and not tracking.same_value("d4", "flip")


def test_a_password_cut_at_the_line_limit_never_shows_its_start():
    from rockcls.core import secrets

    secrets.remember("postgresql://bob:Sw0rdfish-long-secret@db.example/mlflow")
    exc = RuntimeError("x" * 190 + "Sw0rdfish-long-secret and more\nsecond line")
    shown = secrets.hidden_first_line(exc, 200)
    assert "Sw0rd" not in shown and len(shown) <= 200 and "second" not in shown
