"""`python -m rockcls demo`: the whole workflow on synthetic textures, on the CPU, in a few minutes."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from rockcls.commands import ensemble, predict
from rockcls.commands import train as train_command
from rockcls.core import experiments, store
from rockcls.core.config import TrainConfig, build_config
from rockcls.data.synthetic import TEXTURES, make_dataset
from rockcls.search.space import TuneConfig, build_search_config
from rockcls.search.study import run_study
from rockcls.training.trainer import run_training

log = logging.getLogger("rockcls")
COUNTS = [150, 90, 60, 36, 24]  # imbalanced, like the contest's 7 rock types


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rockcls demo", description=__doc__)
    p.add_argument("--out", default="demo_data", help="where the synthetic dataset is written")
    p.add_argument("--experiment", default="", help="MLflow experiment of every demo run; empty = the one "
                   "`mlflow run` or MLFLOW_EXPERIMENT_NAME chose, else rockcls-demo")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--register", default="rockcls-demo", help="registered model name of the demo ensemble")
    p.add_argument("--trials", type=int, default=4, help="trials of the demo's Optuna study; 0 = skip it")
    return p


def make_demo_data(out: Path) -> tuple[Path, Path]:
    """A labelled train tree and an unlabelled test.csv (ID,img_path), as in the contest."""
    train = make_dataset(out / "train", COUNTS, size=48, seed=0)
    test_dir = make_dataset(out / "test_images", [6] * len(COUNTS), size=48, seed=1)
    paths = sorted(p.relative_to(out) for p in test_dir.rglob("*.png"))
    ids = [f"TEST_{i:03d}" for i in range(len(paths))]
    pd.DataFrame({"ID": ids, "img_path": [str(p) for p in paths]}).to_csv(out / "test.csv", index=False)
    truth = [next(c for c in TEXTURES if c in str(p)) for p in paths]
    pd.DataFrame({"ID": ids, "label": truth}).to_csv(out / "test_truth.csv", index=False)
    return train, out / "test.csv"


def demo_config(train: Path, backbone: str, args: argparse.Namespace) -> TrainConfig:
    return build_config(TrainConfig, {
        "data": str(train), "backbone": backbone, "pretrained": False, "img_size": 32,
        "folds": args.folds, "epochs": args.epochs, "batch_size": 32, "lr": 2e-3, "warmup_epochs": 0.5,
        "hn_ratio": 0.2, "hn_memory": 200, "balanced_ratio": 1.0, "augment": "light",
        "num_workers": 0, "device": "cpu", "experiment": args.experiment})


def demo_experiment(requested: str) -> str:
    """The one experiment every demo run goes to."""
    chosen = experiments.chosen_experiment()
    return requested or (experiments.experiment_name(chosen[0]) if chosen else "rockcls-demo")


def predict_and_score(run_id: str, test_csv: Path, out: Path, experiment: str) -> float:
    """Predict the demo's test.csv with d4 TTA and score it against the known truth."""
    predict.main(["--model", f"runs:/{run_id}", "--data", str(test_csv), "--out", str(out), "--tta", "d4",
                  "--num-workers", "0", "--device", "cpu", "--label-column", "label", "--experiment", experiment])
    truth = pd.read_csv(test_csv.with_name("test_truth.csv"))
    pred = pd.read_csv(out)
    return float((pred["label"] == truth["label"]).mean())


def ensemble_and_register(run_ids: list[str], experiment: str, name: str) -> None:
    ensemble.main(["--runs", ",".join(run_ids), "--experiment", experiment, "--register", name, "--tta", "flip"])


def load_registered(name: str, test_csv: Path) -> pd.DataFrame:
    """What a user of the registry does: load by alias, predict on a DataFrame of paths."""
    # A loaded model reads img_path only under the image root it is given (docs/security.md);
    # the CSV's paths are relative to its folder, which is that root here.
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion", model_config={"image_root": str(test_csv.parent)})
    return model.predict(pd.DataFrame({"img_path": pd.read_csv(test_csv)["img_path"].head(3)}))


def distill(train: Path, teacher: str, args: argparse.Namespace) -> tuple[str, float]:
    """A test_efficientnet student of the demo ensemble (by its registered name), ending with one
    network on every image, registered alone: (its run id, its CV macro-F1)."""
    cfg = dataclasses.replace(demo_config(train, "test_efficientnet", args), teacher=f"models:/{teacher}@champion",
                              full_fit=True, seed=7)
    result = train_command.train(cfg)
    ensemble.main(["--runs", result.run_id, "--experiment", args.experiment, "--register", f"{teacher}-student"])
    return result.run_id, result.cv_macro_f1


def search(train: Path, experiment: str, name: str, trials: int) -> str:
    """A small Optuna study (search/tune.py's machinery) whose best trials are ensembled."""
    base, fixed = build_search_config({
        "data": str(train), "backbone": "test_efficientnet", "pretrained": False, "img_size": 32,
        "epochs": 3, "batch_size": 32, "num_workers": 0, "device": "cpu", "experiment": experiment})
    tune = build_config(TuneConfig, {"trials": trials, "top_k": 2, "register": name, "search_lr": "3e-4:1e-2",
                                     "sampler_startup": 2, "pruner_startup": 2, "heartbeat": 10})
    return run_study(base, tune, fixed).summary()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.experiment = demo_experiment(args.experiment)
    out = Path(args.out)
    train, test_csv = make_demo_data(out)
    log.info("synthetic data: %s (%d images in %d classes), %s", train, sum(COUNTS), len(COUNTS), test_csv)
    results = [run_training(demo_config(train, b, args)) for b in ("test_efficientnet", "test_vit")]
    accuracy = predict_and_score(results[0].run_id, test_csv, out / "submission.csv", args.experiment)
    ensemble_and_register([r.run_id for r in results], args.experiment, args.register)
    print(load_registered(args.register, test_csv).to_string())
    student, student_cv = distill(train, args.register, args)
    study = search(train, args.experiment, f"{args.register}-search", args.trials) if args.trials else ""
    print("\nrockcls demo summary")
    for r in results:
        print(f"  train run {r.run_id}: cv_macro_f1 {r.cv_macro_f1:.4f}")
    print(f"  submission {out / 'submission.csv'}: accuracy on the synthetic test set {accuracy:.3f} (d4 TTA)")
    print(f"  registered model: models:/{args.register}@champion")
    print(f"  distilled student {student}: cv_macro_f1 {student_cv:.4f}, one network on every image registered "
          f"as models:/{args.register}-student@champion")
    if study:
        print("  " + study.replace("\n", "\n  "))
    print(f"\nbrowse the runs: {store.browse_hint()}   (experiment {args.experiment!r})")
    return 0 if all(np.isfinite(r.cv_macro_f1) for r in results) else 1
