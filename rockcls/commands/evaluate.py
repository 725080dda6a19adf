"""`rockcls evaluate` (the MLproject `evaluate` entry point): score a model on newly labelled data
and log one evaluation run that shows what it gets wrong.

The model (a train run, an ensemble run or ``models:/NAME@alias`` / ``models:/NAME/VERSION``)
predicts the data (a folder per class, or a CSV with ``img_path,label``) once, with its own TTA.
From those predictions: scikit-learn's macro-F1, accuracy, per-class precision / recall / F1 and
log loss, the expected calibration error, the confusion matrix and a reliability diagram, the
predictions table, and a gallery of the most confidently wrong images. MLflow's own classifier
evaluation (`mlflow.models.evaluate` on the predictions) adds its standard metrics and its
per-class table. Every metric is linked to the dataset and, when the model is a logged model
(a registered version or an ensemble run), to that model: its page shows "macro-F1 on <data>".
Labels the model does not know, missing files and unreadable images are counted, listed in one
line and in ``problems.tsv``, and the rest is evaluated.
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, log_loss, precision_recall_fscore_support

from rockcls.commands.predict import load_predictor
from rockcls.core import names, store, system_metrics, tracking
from rockcls.core.config import EXPERIMENT_DEFAULT, add_config_arguments, command_flags, config_from_args, option
from rockcls.core.errors import ConfigError, DataError
from rockcls.core.gallery import Example, log_gallery
from rockcls.core.metrics import confusion_figure, macro_f1
from rockcls.core.text import shown, utf8_escaped
from rockcls.data.index import DatasetIndex, content_fingerprint, index_dataset
from rockcls.data.sources import FileSource
from rockcls.inference.predictor import TTA_CHOICES, Prediction, Predictor
from rockcls.runs.lookup import parse_model_ref
from rockcls.training.device import keep_freed_memory, resolve_device
from rockcls.training.record import dataset_name, log_data_input

log = logging.getLogger("rockcls")

ECE_BINS = 15


@dataclass
class EvaluateConfig:
    """Parameters of `rockcls evaluate` (the MLproject `evaluate` entry point)."""

    model: str = option("", "a train run id (runs:/ID), an ensemble run id, or models:/NAME@alias|/VERSION")
    data: str = option("", "labelled images: a folder per class, or a CSV with img_path,label columns")
    tta: str = option("auto", "test-time augmentation: none, flip, d4; auto = the model's own", choices=TTA_CHOICES)
    batch_size: int = option(64, "images per batch", min=1)
    num_workers: int = option(2, "DataLoader worker processes", min=0)
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")
    gallery_size: int = option(16, "most confidently wrong images shown (0 = no gallery)", min=0, max=64)
    mlflow_evaluate: bool = option(True, "also run MLflow's classifier evaluation on the predictions")
    experiment: str = option("", f"MLflow experiment of the evaluation run; {EXPERIMENT_DEFAULT}")


@dataclass
class Scores:
    metrics: dict[str, float]
    per_class: pd.DataFrame


def score(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> Scores:
    """Every number of an evaluation, from the true labels and the predicted probabilities."""
    preds = probs.argmax(1)
    k = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=k, zero_division=0)
    metrics = {"macro_f1": macro_f1(labels, preds, len(classes)), "accuracy": float(accuracy_score(labels, preds)),
               "log_loss": float(log_loss(labels, np.clip(probs, 1e-12, 1.0), labels=k)),
               "ece": expected_calibration_error(labels, probs), "num_evaluated": float(len(labels))}
    for name, p, r, f in zip(classes, precision, recall, f1):
        metrics.update({f"precision.{name}": float(p), f"recall.{name}": float(r), f"f1.{name}": float(f)})
    table = pd.DataFrame({"class": classes, "precision": precision, "recall": recall, "f1": f1, "support": support})
    return Scores(metrics, table)


def calibration_bins(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: mean confidence, accuracy and count (top-label)."""
    conf, hit = probs.max(1), (probs.argmax(1) == labels).astype(np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    mean_conf = np.bincount(which, conf, minlength=bins) / np.maximum(count, 1)
    acc = np.bincount(which, hit, minlength=bins) / np.maximum(count, 1)
    return mean_conf, acc, count


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: the count-weighted gap between confidence and accuracy over ``bins`` bins."""
    mean_conf, acc, count = calibration_bins(labels, probs, bins)
    return float((np.abs(acc - mean_conf) * count).sum() / max(count.sum(), 1))


def reliability_figure(labels: np.ndarray, probs: np.ndarray, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean_conf, acc, count = calibration_bins(labels, probs)
    used = count > 0
    centres = (np.arange(ECE_BINS) + 0.5) / ECE_BINS
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(centres[used], acc[used], width=1 / ECE_BINS, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(mean_conf[used], acc[used], "o", color="darkred", markersize=3, label="bin mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top class)", ylabel="accuracy", title=title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def confidently_wrong(index: DatasetIndex, pred: Prediction, n: int) -> list[Example]:
    """The ``n`` wrong predictions with the highest predicted probability, highest first."""
    probs, ok = pred.probs, pred.ok
    preds = np.nan_to_num(probs, nan=-1).argmax(1)
    wrong = np.flatnonzero(ok & (preds != index.labels))
    order = wrong[np.argsort(-probs[wrong, preds[wrong]], kind="stable")][:n]
    return [Example(int(i), index.paths[i], index.classes[index.labels[i]], pred.classes[preds[i]],
                    float(probs[i, preds[i]]), float(-math.log(max(probs[i, index.labels[i]], 1e-12))))
            for i in order]


def predictions_table(index: DatasetIndex, pred: Prediction) -> pd.DataFrame:
    probs = pred.probs
    preds = np.nan_to_num(probs, nan=-1).argmax(1)
    frame = pd.DataFrame({"img_path": [utf8_escaped(p) for p in index.paths],
                          "label": [index.classes[k] for k in index.labels],
                          "predicted": [pred.classes[k] if ok else "" for k, ok in zip(preds, pred.ok)]})
    for k, name in enumerate(pred.classes):
        frame[f"prob_{name}"] = probs[:, k]
    frame["correct"] = [bool(ok and p == t) for p, t, ok in zip(preds, index.labels, pred.ok)]
    frame["error"] = pred.errors
    return frame


def logged_model_id(ref: str) -> str | None:
    """The MLflow LoggedModel behind ``ref`` (a registered version, or an ensemble run's model); a
    train run has none (its checkpoints are artifacts, not a logged model)."""
    kind, target = parse_model_ref(ref)
    client = store.client()
    if kind == "run":
        uri = tracking.get_run(target).data.tags.get(names.MODEL_URI)
        if not uri:
            return None
        target = uri
    name, _, which = target[len("models:/"):].partition("@")
    if which:
        version = client.get_model_version_by_alias(name, which)
    else:
        name, _, number = target[len("models:/"):].rpartition("/")
        version = client.get_model_version(name, number)
    source = version.source or ""  # MLflow 3 registers the logged model as models:/m-<id>
    from_source = source[len("models:/"):] if source.startswith("models:/m-") else None
    return getattr(version, "model_id", None) or from_source


def problems_of(index: DatasetIndex, pred: Prediction) -> list[tuple[str, str]]:
    """(where, what) for every row left out: indexing problems (unknown labels, empty class
    folders, unreadable entries) and images that could not be read."""
    out = [(shown(where), f"{kind}: {detail}") for kind, where, detail in index.problems]
    out += [(shown(path), err) for path, err in zip(index.paths, pred.errors) if err]
    return out


def describe(cfg: EvaluateConfig, predictor: Predictor, tta: str, scores: Scores, n: int, left_out: int) -> str:
    command = " ".join(["python -m rockcls evaluate", *command_flags(cfg)])
    m = scores.metrics
    return (f"**Evaluation** of `{cfg.model}` ({len(predictor.models)} network(s) from {predictor.source}, TTA {tta}) "
            f"on `{cfg.data}`: macro-F1 **{m['macro_f1']:.4f}**, accuracy {m['accuracy']:.4f}, log loss "
            f"{m['log_loss']:.4f}, ECE {m['ece']:.4f} on {n} images ({left_out} left out: `problems.tsv`).\n\n"
            f"Artifacts: `predictions.csv`, `per_class.csv`, `confusion_matrix_rows.png`, `reliability.png` and the "
            f"gallery of the most confidently wrong images (`confidently_wrong.png`).\n\nRepeat it:\n\n```\n{command}\n```")


def mlflow_classifier_evaluation(run_id: str, frame: pd.DataFrame, classes: list[str], name: str,
                                 model_id: str | None) -> None:
    """MLflow's default classifier evaluator on the predictions (its metrics, per-class table and
    confusion matrix), in the evaluation run."""
    import mlflow

    data = frame.loc[frame["error"] == "", ["label", "predicted"]]
    dataset = mlflow.data.from_pandas(data, name=name, targets="label", predictions="predicted")
    # A class never predicted makes its precision 0 (our per-class table says so); scikit-learn's
    # warning about it, raised inside MLflow's evaluator, would only repeat that.
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        mlflow.models.evaluate(data=dataset, model_type="classifier", model_id=model_id,
                               evaluator_config={"label_list": classes, "log_model_explainability": False})


def log_evaluation(run_id: str, cfg: EvaluateConfig, index: DatasetIndex, pred: Prediction, predictor: Predictor,
                   tta: str, scores: Scores, left_out: list[tuple[str, str]]) -> None:
    ok = pred.ok
    labels, probs = index.labels[ok], pred.probs[ok]
    fingerprint = content_fingerprint(index)
    name = dataset_name(cfg.data)
    model_id = logged_model_id(cfg.model)
    tracking.set_description(run_id, describe(cfg, predictor, tta, scores, int(ok.sum()), len(left_out)))
    log_data_input(run_id, index, cfg.data, fingerprint, context="evaluation")
    tracking.log_params(run_id, {**vars(cfg), "resolved_tta": tta, "num_models": len(predictor.models),
                                 "model_source": predictor.source, "model_id": model_id or ""})
    tracking.log_linked_metrics(run_id, {**scores.metrics, "num_left_out": float(len(left_out))},
                                dataset_name=name, dataset_digest=fingerprint, model_id=model_id)
    frame = predictions_table(index, pred)
    tracking.log_text(run_id, frame.to_csv(index=False), names.PREDICTIONS_FILE)
    tracking.log_text(run_id, scores.per_class.to_csv(index=False), names.PER_CLASS_FILE)
    tracking.log_figure(run_id, confusion_figure(labels, probs.argmax(1), index.classes,
                                                 f"{name}: counts, colour = row share"),
                        names.CONFUSION_ROWS_FIGURE)
    tracking.log_figure(run_id, reliability_figure(labels, probs, f"ECE {scores.metrics['ece']:.3f}"),
                        names.RELIABILITY_FIGURE)
    if left_out:
        tracking.log_text(run_id, "where\tproblem\n" + "".join(f"{w}\t{p}\n" for w, p in left_out), names.PROBLEMS_FILE)
    if cfg.gallery_size:
        log_gallery(run_id, FileSource(index.paths), confidently_wrong(index, pred, cfg.gallery_size),
                    key=names.CONFIDENTLY_WRONG, step=0, table_file=f"{names.CONFIDENTLY_WRONG}.csv",
                    image_file=f"{names.CONFIDENTLY_WRONG}.png")
    if cfg.mlflow_evaluate:
        mlflow_classifier_evaluation(run_id, frame, list(index.classes), name, model_id)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rockcls evaluate",
                                     description="score a model on labelled images and log what it gets wrong")
    add_config_arguments(parser, EvaluateConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(EvaluateConfig, build_parser().parse_args(argv))
    if not cfg.model:
        raise ConfigError("model: required (a train or ensemble run id, or models:/NAME@alias)")
    device = resolve_device(cfg.device)
    keep_freed_memory()
    predictor = load_predictor(cfg.model, device=device)
    index = index_dataset(cfg.data, classes=predictor.classes, labeled=True, check=False)
    if not len(index):
        raise DataError(f"data: no image of {cfg.data} has a label the model knows ({', '.join(predictor.classes)})")
    tta = predictor.tta if cfg.tta == "auto" else cfg.tta
    run_id = tracking.start_run(experiment=cfg.experiment, name="evaluate", kind="evaluate", adopt_env_run=True,
                                tags={names.MODEL: cfg.model})
    with tracking.closing(run_id), system_metrics.system_metrics(run_id):
        pred = predictor.predict(index.paths, tta=tta, batch_size=cfg.batch_size, device=device,
                                 num_workers=cfg.num_workers)
        left_out = problems_of(index, pred)
        if not pred.ok.any():
            raise DataError(f"data: none of the {len(index)} image(s) could be read; first: {left_out[-1][0]} "
                            f"({left_out[-1][1]})")
        if left_out:
            listing = "; ".join(f"{w} ({p})" for w, p in left_out[:3])
            log.warning("%d row(s) left out of the evaluation: %s%s", len(left_out), listing,
                        f" and {len(left_out) - 3} more (problems.tsv)" if len(left_out) > 3 else "")
        scores = score(index.labels[pred.ok], pred.probs[pred.ok], list(index.classes))
        log_evaluation(run_id, cfg, index, pred, predictor, tta, scores, left_out)
    m = scores.metrics
    print(f"evaluate run {run_id}: macro-F1 {m['macro_f1']:.4f}, accuracy {m['accuracy']:.4f}, log loss "
          f"{m['log_loss']:.4f}, ECE {m['ece']:.4f} on {int(pred.ok.sum())} image(s), {len(left_out)} left out "
          f"({tracking.run_location(run_id)})")
    return 0
