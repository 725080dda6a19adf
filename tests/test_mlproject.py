"""The MLproject as users run it: `mlflow run . -e train|ensemble|predict --env-manager local`.

Every command runs in the experiment `mlflow run` chose (Default without --experiment-name, else
the named one), so the ensemble finds the train runs and each workflow lands in one experiment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
TINY = {"backbone": "test_vit", "pretrained": "false", "img_size": "32", "folds": "2", "epochs": "1",
        "batch_size": "16", "num_workers": "0", "device": "cpu", "hn_memory": "64", "cache": "false"}


def mlflow_run(entry: str, params: dict[str, str], cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """``mlflow run`` of this checkout's MLproject, with this checkout's rockcls and Python."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local", *extra]
    for key, value in params.items():
        argv += ["-P", f"{key}={value}"]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


def run_workflow(data: Path, work: Path, model: str, *extra: str) -> None:
    """The README's `mlflow run` lines: train twice, ensemble the top 2, predict by alias."""
    for lr in ("0.0003", "0.001"):
        done = mlflow_run("train", {"data": str(data), "lr": lr, "output_dir": str(work / "outputs"), **TINY},
                          work, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    done = mlflow_run("ensemble", {"top": "2", "register": model}, work, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    images = sorted(data.rglob("*.png"))[::10]
    pd.DataFrame({"ID": range(len(images)), "img_path": [str(p) for p in images]}).to_csv(work / "t.csv", index=False)
    done = mlflow_run("predict", {"model": f"models:/{model}@champion", "data": str(work / "t.csv"),
                                  "out": str(work / f"{model}.csv"), "num_workers": "0", "device": "cpu"}, work, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(pd.read_csv(work / f"{model}.csv")) == len(images)


def check_one_experiment(client: MlflowClient, exp_id: str, model: str) -> None:
    """Every run of one workflow is in ``exp_id``; the ensemble took exactly its train runs."""
    runs = client.search_runs([exp_id], max_results=100)
    top = {r.data.tags["rockcls.kind"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert sorted(r.data.tags["rockcls.kind"] for r in runs if "mlflow.parentRunId" not in r.data.tags) == [
        "ensemble", "predict", "train", "train"]
    trains = [r.info.run_id for r in runs if r.data.tags["rockcls.kind"] == "train"]
    assert sorted(top["ensemble"].data.tags["rockcls.members"].split(",")) == sorted(trains)
    assert top["predict"].data.tags["rockcls.model"] == f"models:/{model}@champion"
    assert all(r.data.tags["mlflow.source.type"] == "PROJECT" for r in top.values())  # the runs mlflow run made
    (logged,) = client.search_logged_models([exp_id])
    assert logged.source_run_id == top["ensemble"].info.run_id
    assert client.get_model_version_by_alias(model, "champion").run_id == top["ensemble"].info.run_id


def test_train_twice_ensemble_top_k_and_predict_by_alias_through_mlflow_run(mlflow_store, synthetic_dir, tmp_path):
    client = MlflowClient()
    run_workflow(synthetic_dir, tmp_path, "plain")  # no --experiment-name: mlflow run picks Default
    check_one_experiment(client, "0", "plain")
    # Same store, named experiment: top-K must see only its own two train runs, not Default's.
    run_workflow(synthetic_dir, tmp_path, "named", "--experiment-name", "lithology")
    check_one_experiment(client, client.get_experiment_by_name("lithology").experiment_id, "named")
    assert {e.name for e in client.search_experiments()} == {"Default", "lithology"}  # no stray `rockcls`


def test_an_experiment_parameter_under_mlflow_run_is_refused(mlflow_store, tmp_path):
    done = mlflow_run("ensemble", {"experiment": "other"}, tmp_path, "--experiment-name", "named")
    assert done.returncode != 0
    assert ("rockcls: error: experiment: 'other' cannot take effect: `mlflow run` chose experiment 'named'; "
            "give `--experiment-name other` to mlflow run instead") in done.stderr


def test_a_password_in_the_tune_storage_parameter_ends_cleanly_saying_where_it_goes(mlflow_store, synthetic_dir,
                                                                                  tmp_path):
    """MLflow prints the command line and logs the parameter before tune starts (nothing in the
    project can stop that); tune refuses in one line and `mlflow run` ends without a traceback."""
    done = mlflow_run("tune", {"data": str(synthetic_dir), "trials": "1",
                               "storage": "postgresql://u:Zq81-secret@db.invalid/optuna"}, tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("rockcls: error:")]
    assert len(errors) == 1 and "pass the password in $ROCKCLS_STORAGE or ~/.pgpass instead" in errors[0]
    assert "mlflow runs delete --run-id" in errors[0] and "Zq81-secret" not in errors[0]
    assert done.stderr.strip().splitlines()[-1].endswith("failed ===")
    (run,) = MlflowClient().search_runs(["0"])
    assert (run.info.status, run.info.lifecycle_stage) == ("FAILED", "active")
