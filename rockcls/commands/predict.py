"""`rockcls predict` (the MLproject `predict` entry point): a submission CSV and logits for a folder or CSV of images, from a train run or a registered model, logged as a predict run."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from rockcls.core import names, system_metrics, tracking
from rockcls.core.config import (
    EXPERIMENT_DEFAULT,
    add_config_arguments,
    command_flags,
    config_from_args,
    option,
)
from rockcls.core.errors import ConfigError, DataError
from rockcls.core.text import shown
from rockcls.data.index import DatasetIndex, content_fingerprint, index_dataset
from rockcls.inference.predictor import TTA_CHOICES, Prediction, Predictor
from rockcls.runs import registry
from rockcls.runs.lookup import load_run_predictor, parse_model_ref
from rockcls.training.device import keep_freed_memory, resolve_device
from rockcls.training.record import log_data_input

log = logging.getLogger("rockcls")


def load_predictor(ref: str, device: str | torch.device = "cpu") -> Predictor:
    """A train run's folds, or the ensemble inside a registered (or ensemble-run) pyfunc model."""
    kind, target = parse_model_ref(ref)
    if kind == "registry":
        return registry.load_registered_predictor(target)
    tags = tracking.get_run(target).data.tags
    if tags.get(names.KIND) == "ensemble" and tags.get(names.MODEL_URI):
        return registry.load_registered_predictor(tags[names.MODEL_URI])
    return load_run_predictor(target, device=device)


@dataclass
class PredictConfig:
    """Parameters of `rockcls predict` (the MLproject `predict` entry point)."""

    model: str = option("", "runs:/<train run id>, a train run id, or models:/NAME@alias|/VERSION")
    data: str = option("", "folder of images, or a CSV with img_path (and ID) columns")
    out: str = option("submission.csv", "submission CSV to write (the logits go next to it)")
    tta: str = option("auto", "test-time augmentation: none, flip, d4; auto = the model's own (a registered "
                            "model's, or the views of a train run's OOF predictions)", choices=TTA_CHOICES)
    batch_size: int = option(64, "images per batch", min=1)
    num_workers: int = option(2, "DataLoader worker processes", min=0)
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")
    id_column: str = option("ID", "submission column holding the image id")
    label_column: str = option("rock_type", "submission column holding the predicted class")
    experiment: str = option("", f"MLflow experiment of the predict run; {EXPERIMENT_DEFAULT}")


def build_submission(ids: Sequence[str], pred: Prediction, *, id_column: str, label_column: str) -> pd.DataFrame:
    """The contest's two columns, plus ``error`` only when some image could not be read."""
    frame = pd.DataFrame({id_column: list(ids), label_column: pred.labels})
    if not pred.ok.all():
        frame["error"] = pred.errors
    return frame


def save_prediction(frame: pd.DataFrame, pred: Prediction, ids: Sequence[str], paths: Sequence[str],
                    out: Path, tta: str) -> Path:
    """Write the submission CSV and ``<stem>_logits.npz`` next to it; return the npz path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # Ids are UTF-8 text already (`rockcls.data.index` escapes the others); should any text still
    # not encode, it is escaped rather than losing every finished prediction.
    frame.to_csv(out, index=False, encoding="utf-8", errors="backslashreplace")
    npz = out.with_name(f"{out.stem}_logits.npz")
    np.savez_compressed(npz, ids=np.asarray(ids), paths=np.asarray(paths), logits=pred.logits,
                        probs=pred.probs.astype(np.float32), classes=np.asarray(pred.classes),
                        error=np.asarray(pred.errors), tta=np.asarray(tta))
    return npz


def log_prediction(run_id: str, cfg: PredictConfig, pred: Prediction, predictor: Predictor, tta: str,
                   files: Sequence[Path], index: DatasetIndex) -> None:
    bad = [(i, e) for i, e in enumerate(pred.errors) if e]
    tracking.set_description(run_id, describe_prediction(cfg, predictor, tta, len(pred.errors), len(bad)))
    log_data_input(run_id, index, cfg.data, content_fingerprint(index), context="inference")
    tracking.log_params(run_id, {**vars(cfg), "resolved_tta": tta, "num_models": len(predictor.models),
                                 "model_source": predictor.source})
    tracking.log_metrics(run_id, {"num_images": len(pred.errors), "num_errors": len(bad)})
    for path in files:
        tracking.log_file(run_id, path)
    if bad:
        tracking.log_text(run_id, "row\terror\n" + "".join(f"{i}\t{e}\n" for i, e in bad), names.ERRORS_FILE)


def describe_prediction(cfg: PredictConfig, predictor: Predictor, tta: str, n: int, unreadable: int) -> str:
    command = " ".join(["python -m rockcls predict", *command_flags(cfg)])
    return (f"**Predictions** of `{cfg.data}` ({n} images, {unreadable} unreadable) with `{cfg.model}` "
            f"({len(predictor.models)} model(s) from {predictor.source}), TTA {tta}, written to `{cfg.out}` "
            f"(artifacts: the submission and its logits).\n\nRepeat it:\n\n```\n{command}\n```")


def warn_errors(pred: Prediction, paths: Sequence[str]) -> None:
    bad = [(p, e) for p, e in zip(paths, pred.errors) if e]
    if not bad:
        return
    if len(bad) == len(paths):
        raise DataError(f"data: none of the {len(paths)} image(s) could be read; first: {shown(bad[0][0])} "
                        f"({bad[0][1]})")
    listing = "; ".join(f"{shown(p)} ({e})" for p, e in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    log.warning("%d unreadable image(s) have an empty label and an error column: %s%s", len(bad), listing, more)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rockcls predict", description="predict a folder or CSV of images with a train run or registered model")
    add_config_arguments(parser, PredictConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(PredictConfig, build_parser().parse_args(argv))
    if not cfg.model:
        raise ConfigError("model: required (runs:/<train run id> or models:/NAME@alias)")
    index = index_dataset(cfg.data, labeled=False)
    device = resolve_device(cfg.device)
    keep_freed_memory()
    predictor = load_predictor(cfg.model, device=device)
    tta = predictor.tta if cfg.tta == "auto" else cfg.tta
    # The run opens before the work, so its System Metrics tab covers the prediction; the CSV is
    # written before anything is logged, so no logging problem can lose the predictions.
    run_id = tracking.start_run(experiment=cfg.experiment, name="predict", kind="predict", adopt_env_run=True,
                                tags={names.MODEL: cfg.model})
    with tracking.closing(run_id), system_metrics.system_metrics(run_id):
        pred = predictor.predict(index.paths, tta=tta, batch_size=cfg.batch_size, device=device,
                                 num_workers=cfg.num_workers)
        warn_errors(pred, index.paths)
        frame = build_submission(index.ids, pred, id_column=cfg.id_column, label_column=cfg.label_column)
        out = Path(cfg.out)
        npz = save_prediction(frame, pred, index.ids, index.paths, out, tta)
        log_prediction(run_id, cfg, pred, predictor, tta, [out, npz], index)
    print(f"predict run {run_id}: {len(frame)} row(s), {int((~pred.ok).sum())} unreadable, tta {tta} -> {out}")
    return 0
