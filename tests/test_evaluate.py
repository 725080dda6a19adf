"""`rockcls evaluate`: a model scored on labelled data, in one evaluation run whose metrics are
linked to the model and the dataset, with its mistakes and calibration as artifacts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import f1_score

from rockcls.commands import ensemble as ensemble_cmd
from rockcls.commands import evaluate as evaluate_cmd
from rockcls.core import names, tracking
from rockcls.core.errors import ConfigError, DataError
from rockcls.training.trainer import run_training

from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def champion(store, synthetic_dir):
    """One tiny train run, registered alone as models:/evalme@champion."""
    run = run_training(tiny_config(synthetic_dir, backbone="test_vit", epochs=1, tta="flip")).run_id
    assert ensemble_cmd.main(["--runs", run, "--no-bias", "--register", "evalme"]) == 0
    return run


@pytest.fixture(scope="module")
def new_batch(tmp_path_factory, synthetic_dir) -> Path:
    """A labelled CSV: 12 known images, one label the model does not know, one missing file and
    one file that is not an image."""
    root = tmp_path_factory.mktemp("batch")
    files = sorted(Path(synthetic_dir).rglob("*.png"))[::6][:12]
    rows = [(str(f), f.parent.name) for f in files]
    (root / "junk.png").write_bytes(b"not an image")
    rows += [(str(files[0]), "granite"), (str(root / "gone.png"), files[0].parent.name),
             (str(root / "junk.png"), files[0].parent.name)]
    pd.DataFrame(rows, columns=["img_path", "label"]).to_csv(root / "batch.csv", index=False)
    return root / "batch.csv"


def test_an_evaluation_run_scores_a_registered_model_and_links_metrics_to_it(champion, new_batch, capsys):
    assert evaluate_cmd.main(["--model", "models:/evalme@champion", "--data", str(new_batch), "--device", "cpu",
                              "--num-workers", "0", "--gallery-size", "4"]) == 0
    out = capsys.readouterr().out
    run = tracking.search_runs("", f"tags.`{names.KIND}` = 'evaluate'")[0]
    assert f"evaluate run {run.info.run_id}: macro-F1" in out and "12 image(s), 3 left out" in out
    m = run.data.metrics
    table = pd.read_csv(tracking.download(run.info.run_id, "predictions.csv"))
    good = table[table["error"].isna()]
    assert len(table) == 14 and len(good) == 12  # the unknown label never reached the model
    expected = f1_score(good["label"], good["predicted"], average="macro", labels=sorted(table["label"].unique()))
    assert m["macro_f1"] == pytest.approx(expected) and m["num_evaluated"] == 12 and m["num_left_out"] == 3
    assert {"accuracy", "log_loss", "ece", "accuracy_score", "f1_score"} <= set(m)  # ours and MLflow's evaluator's
    assert 0 <= m["ece"] <= 1 and all(f"f1.{c}" in m for c in table["label"].unique())
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(m)  # System Metrics tab
    artifacts = set(tracking.list_artifacts(run.info.run_id))
    assert {"predictions.csv", "per_class.csv", "confusion_matrix_rows.png", "confusion_matrix.png", "reliability.png",
            "per_class_metrics.csv", "problems.tsv",
            "confidently_wrong.png", "confidently_wrong.csv"} <= artifacts
    problems = tracking.download(run.info.run_id, "problems.tsv").read_text()
    assert "granite" in problems and "gone.png" in problems and "junk.png" in problems
    wrong = pd.read_csv(tracking.download(run.info.run_id, "confidently_wrong.csv"))
    assert len(wrong) <= 4 and (wrong["label"] != wrong["predicted"]).all()
    assert list(wrong["prob"]) == sorted(wrong["prob"], reverse=True)

    client = MlflowClient()
    version = client.get_model_version_by_alias("evalme", "champion")
    model_id = version.model_id or version.source.removeprefix("models:/")  # sqlite stores keep it in source
    assert model_id.startswith("m-") and run.data.params["model_id"] == model_id
    linked = [mm for mm in client.get_logged_model(model_id).metrics if mm.key == "macro_f1"]
    assert len(linked) == 1 and linked[0].value == pytest.approx(m["macro_f1"])
    assert linked[0].dataset_name and linked[0].dataset_digest and linked[0].run_id == run.info.run_id
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert any(d.dataset.digest == linked[0].dataset_digest for d in inputs)


def test_a_train_run_and_a_class_folder_evaluate_too_and_bad_input_is_one_line(champion, synthetic_dir, tmp_path):
    assert evaluate_cmd.main(["--model", champion, "--data", str(synthetic_dir), "--device", "cpu",
                              "--num-workers", "0", "--gallery-size", "0", "--mlflow-evaluate", "false"]) == 0
    run = tracking.search_runs("", f"tags.`{names.KIND}` = 'evaluate'", order_by=["attributes.start_time DESC"])[0]
    assert run.data.params["model_id"] == "" and run.data.metrics["num_left_out"] == 0
    assert "confidently_wrong.png" not in tracking.list_artifacts(run.info.run_id)
    strange = tmp_path / "strange"
    shutil.copytree(Path(synthetic_dir) / sorted(p.name for p in Path(synthetic_dir).iterdir())[0], strange / "basalt")
    with pytest.raises(DataError, match="no image of .* has a label the model knows"):
        evaluate_cmd.main(["--model", champion, "--data", str(strange), "--device", "cpu", "--num-workers", "0"])
    with pytest.raises(ConfigError, match="model: required"):
        evaluate_cmd.main(["--data", str(synthetic_dir)])


def test_expected_calibration_error_by_hand():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    # bins (15): 0.9 -> right, 0.6 -> right, 0.8 -> right, 0.7 -> wrong; each alone in its bin
    expected = (abs(1 - 0.9) + abs(1 - 0.6) + abs(1 - 0.8) + abs(0 - 0.7)) / 4
    assert evaluate_cmd.expected_calibration_error(labels, probs) == pytest.approx(expected)
