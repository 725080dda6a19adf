import subprocess
import sys

import mlflow.pyfunc
import pandas as pd
from mlflow.tracking import MlflowClient


def test_demo_runs_the_whole_workflow(mlflow_store, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rockcls", "demo", "--epochs", "2", "--folds", "2", "--trials", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.count("cv_macro_f1") >= 2 and "accuracy on the synthetic test set" in out
    assert "2/2 trials finished" in out
    # The closing line names the store the runs went to (here the test's), not a guessed ./mlflow.db.
    assert f"browse the runs: mlflow ui --backend-store-uri {mlflow_store}   (experiment 'rockcls-demo')" in out
    client = MlflowClient()
    assert {e.name for e in client.search_experiments()} == {"Default", "rockcls-demo"}
    assert client.search_runs(["0"]) == [] and client.search_logged_models(["0"]) == []
    demo = client.get_experiment_by_name("rockcls-demo").experiment_id
    kinds = {r.data.tags["rockcls.kind"] for r in client.search_runs([demo], max_results=500)}
    assert kinds == {"train", "fold", "full", "predict", "ensemble", "study", "trial"}
    assert len(client.search_logged_models([demo])) == 3  # the demo's ensemble, its student and the study's
    assert "distilled student" in out
    student = client.get_model_version_by_alias("rockcls-demo-student", "champion")
    assert student.tags["rockcls.networks"] == "full"
    submission = pd.read_csv(tmp_path / "demo_data" / "submission.csv")
    assert len(submission) == 30 and submission["label"].notna().all()
    assert "img_path: not accepted" not in out and "img_path: refused" not in out  # the demo's own img_path rows
    test_images = tmp_path / "demo_data" / "test_images"
    model = mlflow.pyfunc.load_model("models:/rockcls-demo@champion", model_config={"image_root": str(test_images)})
    image = next(test_images.rglob("*.png"))
    pred = model.predict(pd.DataFrame({"img_path": [str(image)]}))
    assert pred["label"].iloc[0].startswith("synthetic_")
