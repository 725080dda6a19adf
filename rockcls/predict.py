"""Prediction with a train run's fold checkpoints or a registered ensemble, with test-time augmentation.

Every model (fold checkpoint, ensemble member) turns a batch into softmax probabilities; these are
averaged over TTA views and models (weighted for an ensemble). The "logits" that prediction
returns and saves are the log of that average plus the ensemble's per-class bias (zero for a train
run): the argmax of those scores is the predicted class, and their softmax is the reported
probability. The ensemble search (``rockcls.ensemble``) scores its weights with the same rule.

An image that cannot be read is never given a default class: its row keeps an empty label, NaN
scores and the reason in ``error``, and the command warns naming it (it fails if none is readable).
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from rockcls import tracking
from rockcls.checkpoint import load_checkpoint
from rockcls.config import EXPERIMENT_DEFAULT, _opt, add_config_arguments, command_flags, config_from_args
from rockcls.data import MIN_SIDE, DatasetIndex, FileSource, content_fingerprint, index_dataset
from rockcls.engine import StepSettings, autocast, prepare_batch
from rockcls.errors import ConfigError, DataError, RockclsError
from rockcls.models import build_model_from_spec
from rockcls.progress import track
from rockcls.train import log_data_input, resolve_amp, resolve_device
from rockcls.transforms import TTA_VIEWS, build_eval_transform, dihedral, tta_views

log = logging.getLogger("rockcls")

TTA_CHOICES = ("auto", *TTA_VIEWS)
TRAIN_KINDS = ("train", "trial")
RUN_ID = re.compile(r"[0-9a-f]{32}")

ModelSpec = tuple[torch.nn.Module, dict[str, Any]]


# ---------------------------------------------------------------------------- batched prediction

@dataclass
class Prediction:
    """Scores of every input row; rows that could not be read have NaN scores and a reason."""

    logits: np.ndarray
    classes: list[str]
    errors: list[str]

    @property
    def ok(self) -> np.ndarray:
        return np.asarray([not e for e in self.errors], dtype=bool)

    @property
    def probs(self) -> np.ndarray:
        """Softmax of the scores (NaN rows stay NaN)."""
        out = np.full(self.logits.shape, np.nan, dtype=np.float64)
        good = self.logits[self.ok].astype(np.float64)
        e = np.exp(good - good.max(axis=1, keepdims=True))
        out[self.ok] = e / e.sum(axis=1, keepdims=True)
        return out

    @property
    def labels(self) -> list[str]:
        """Predicted class names; "" for rows that could not be read."""
        best = np.argmax(np.nan_to_num(self.logits, nan=0.0), axis=1)
        return [self.classes[k] if good else "" for k, good in zip(best, self.ok)]


class _ReadableImages(torch.utils.data.Dataset):
    """Rows of a source as uint8 CHW tensors, or a blank tensor plus the reason it is unusable.

    Training rejects or skips the same images (`rockcls.data.check_image`); here the row stays,
    so the output keeps one row per input.
    """

    def __init__(self, source, transform, img_size: int):
        self.source, self.transform, self.img_size = source, transform, img_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, int]:
        blank = torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8)
        try:
            img = self.source.read(i)
        except DataError as exc:
            return blank, str(exc).split(": ", 1)[-1], i
        if min(img.shape[:2]) < MIN_SIDE:
            return blank, f"too small ({img.shape[1]}x{img.shape[0]} px, need {MIN_SIDE})", i
        img = np.ascontiguousarray(self.transform(image=img)["image"])
        return torch.from_numpy(img).permute(2, 0, 1), "", i


@torch.inference_mode()
def predict_logits(models: Sequence[ModelSpec], source, *, tta: str = "none",
                   weights: Sequence[float] | None = None, batch_size: int = 64,
                   device: str | torch.device = "cpu", num_workers: int = 0,
                   desc: str = "predict") -> tuple[np.ndarray, list[str]]:
    """Log of the (weighted) mean softmax over models and TTA views, and a reason per bad row.

    Models sharing an input size and preset share one pass over the images; views are applied to
    the normalised batch on the device, so each image is decoded once per pass.
    """
    views = tta_views(tta)
    if not models:
        raise RockclsError("predict: no models to predict with")
    device = resolve_device(device) if isinstance(device, str) else device
    for model, _ in models:
        model.to(device).eval()
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
    w = np.ones(len(models)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != len(models) or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"weights: need {len(models)} non-negative weights with a positive sum")
    w = w / w.sum()
    n, num_classes = len(source), models[0][1]["num_classes"]
    total = np.zeros((n, num_classes), dtype=np.float64)
    errors = [""] * n
    for (img_size, augment), members in _group_by_input(models, w).items():
        loader = torch.utils.data.DataLoader(
            _ReadableImages(source, build_eval_transform(augment, img_size), img_size),
            batch_size=batch_size, shuffle=False, num_workers=num_workers,
            pin_memory=device.type == "cuda")
        for x, reasons, pos in track(loader, total=len(loader), desc=desc):
            total[pos.numpy()] += _batch_probs(members, x, views, device, resolve_amp("auto", device))
            for p, r in zip(pos.tolist(), reasons):
                errors[p] = errors[p] or r
    with np.errstate(divide="ignore"):
        logits = np.log(total).astype(np.float32)
    logits[np.asarray([bool(e) for e in errors], dtype=bool)] = np.nan
    return logits, errors


def _group_by_input(models: Sequence[ModelSpec], weights: np.ndarray) -> dict[tuple[int, str], list]:
    groups: dict[tuple[int, str], list] = {}
    for (model, spec), wt in zip(models, weights):
        groups.setdefault((int(spec["img_size"]), spec["augment"]), []).append((model, spec, float(wt)))
    return groups


def _batch_probs(members: list, x: torch.Tensor, views: tuple[int, ...], device: torch.device,
                 amp: torch.dtype | None) -> np.ndarray:
    out = torch.zeros(x.shape[0], members[0][1]["num_classes"], dtype=torch.float32, device=device)  # MPS lacks float64
    for model, spec, wt in members:
        s = StepSettings(device=device, mean=tuple(spec["mean"]), std=tuple(spec["std"]), amp_dtype=amp,
                         channels_last=device.type == "cuda")
        xn = prepare_batch(x, s)
        for v in views:
            with autocast(s):
                logits = model(dihedral(xn, v))
            out += torch.softmax(logits.float(), dim=1) * (wt / len(views))
    return out.cpu().numpy().astype(np.float64)


# ---------------------------------------------------------------------------- models

@dataclass
class Predictor:
    """Models with their weights, the class names and the per-class bias: what predicts."""

    models: list[ModelSpec]
    weights: list[float]
    classes: list[str]
    bias: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tta: str = "none"
    source: str = ""

    def predict(self, paths: Sequence[str], *, tta: str | None = None, batch_size: int = 64,
                device: str | torch.device = "auto", num_workers: int = 0) -> Prediction:
        return self.predict_source(FileSource(paths), tta=tta, batch_size=batch_size, device=device,
                                   num_workers=num_workers)

    def predict_source(self, source, *, tta: str | None = None, batch_size: int = 64,
                       device: str | torch.device = "auto", num_workers: int = 0) -> Prediction:
        """Like `predict`, for any source with ``len`` and ``read(row)`` (e.g. request bytes)."""
        logits, errors = predict_logits(self.models, source, tta=tta or self.tta,
                                        weights=self.weights, batch_size=batch_size, device=device,
                                        num_workers=num_workers)
        bias = self.bias if len(self.bias) else np.zeros(len(self.classes))
        return Prediction((logits + bias.astype(np.float32)[None, :]), list(self.classes), errors)


def load_models(paths: Sequence[str | Path], device: str | torch.device = "cpu") -> list[ModelSpec]:
    """Rebuild each checkpoint's model from the spec stored in it (no training config needed)."""
    models = []
    for path in paths:
        ck = load_checkpoint(path)
        if "model" not in ck or "spec" not in ck:
            raise RockclsError(f"checkpoint {path} lacks model weights or spec (not a rockcls model.pt)")
        model = build_model_from_spec(ck["spec"])
        model.load_state_dict(ck["model"])
        models.append((model.to(device).eval(), ck["spec"]))
    classes = {tuple(spec["classes"]) for _, spec in models}
    if len(classes) > 1:
        raise RockclsError(f"checkpoints disagree on the class names: {sorted(classes)}")
    return models


def check_train_run(run_id: str) -> Any:
    """The run, if it is a completed train (or trial) run; a one-line error otherwise."""
    run = tracking.get_run(run_id)
    kind = run.data.tags.get(tracking.KIND)
    if kind not in TRAIN_KINDS:
        raise RockclsError(f"run {run_id} is a {kind or 'untagged'} run, not a train run")
    if run.data.tags.get("rockcls.complete") != "true":
        raise RockclsError(f"train run {run_id} did not complete (status {run.info.status}); "
                           f"resume it or use another run")
    return run


def download_run_checkpoints(run_id: str, dst: str | Path) -> list[Path]:
    """The model.pt of every fold of a completed train run (downloaded under ``dst``), in fold order."""
    run = check_train_run(run_id)
    folds = [r for r in tracking.child_runs(run_id, kind="fold") if r.data.tags.get("rockcls.complete") == "true"]
    folds.sort(key=lambda r: int(r.data.tags.get("rockcls.fold", "0")))
    expected = int(run.data.tags.get("rockcls.folds", len(folds)))
    if not folds or len(folds) != expected:
        raise RockclsError(f"train run {run_id}: found {len(folds)} finished fold run(s), expected {expected}")
    return [tracking.download(r.info.run_id, "checkpoints/model.pt", str(Path(dst) / f"fold_{k}"))
            for k, r in enumerate(folds)]


def load_run_predictor(run_id: str, device: str | torch.device = "cpu") -> Predictor:
    """All fold checkpoints of a train run, equally weighted."""
    with tempfile.TemporaryDirectory(prefix="rockcls-ckpt-") as tmp:
        models = load_models(download_run_checkpoints(run_id, tmp), device=device)
    return Predictor(models, [1.0] * len(models), list(models[0][1]["classes"]),
                     tta=models[0][1].get("tta", "none"), source=f"runs:/{run_id}")


def parse_model_ref(ref: str) -> tuple[str, str]:
    """("run", run_id) for ``runs:/<id>`` or a bare id, ("registry", uri) for ``models:/...``."""
    ref = ref.strip()
    if ref.startswith("models:/"):
        return "registry", ref
    run_id = ref[len("runs:/"):].strip("/").split("/")[0] if ref.startswith("runs:/") else ref
    if not RUN_ID.fullmatch(run_id):
        raise ConfigError(f"model: expected runs:/<train run id>, a run id or models:/NAME@alias "
                          f"(or models:/NAME/VERSION); got {ref!r}")
    return "run", run_id


def load_predictor(ref: str, device: str | torch.device = "cpu") -> Predictor:
    """A train run's folds, or the ensemble inside a registered (or ensemble-run) pyfunc model."""
    from rockcls import registry

    kind, target = parse_model_ref(ref)
    if kind == "registry":
        return registry.load_registered_predictor(target)
    tags = tracking.get_run(target).data.tags
    if tags.get(tracking.KIND) == "ensemble" and tags.get(registry.MODEL_URI_TAG):
        return registry.load_registered_predictor(tags[registry.MODEL_URI_TAG])
    return load_run_predictor(target, device=device)


# ---------------------------------------------------------------------------- the command

@dataclass
class PredictConfig:
    """Parameters of `rockcls predict` (the MLproject `predict` entry point)."""

    model: str = _opt("", "runs:/<train run id>, a train run id, or models:/NAME@alias|/VERSION")
    data: str = _opt("", "folder of images, or a CSV with img_path (and ID) columns")
    out: str = _opt("submission.csv", "submission CSV to write (the logits go next to it)")
    tta: str = _opt("auto", "test-time augmentation: none, flip, d4; auto = the model's own (a registered "
                            "model's, or the views of a train run's OOF predictions)", choices=TTA_CHOICES)
    batch_size: int = _opt(64, "images per batch", min=1)
    num_workers: int = _opt(2, "DataLoader worker processes", min=0)
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N or mps")
    id_column: str = _opt("ID", "submission column holding the image id")
    label_column: str = _opt("rock_type", "submission column holding the predicted class")
    experiment: str = _opt("", f"MLflow experiment of the predict run; {EXPERIMENT_DEFAULT}")


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
    frame.to_csv(out, index=False)
    npz = out.with_name(f"{out.stem}_logits.npz")
    np.savez_compressed(npz, ids=np.asarray(ids), paths=np.asarray(paths), logits=pred.logits,
                        probs=pred.probs.astype(np.float32), classes=np.asarray(pred.classes),
                        error=np.asarray(pred.errors), tta=np.asarray(tta))
    return npz


def log_prediction(cfg: PredictConfig, pred: Prediction, predictor: Predictor, tta: str,
                   files: Sequence[Path], index: DatasetIndex) -> str:
    run_id = tracking.start_run(experiment=cfg.experiment, name="predict", kind="predict", adopt_env_run=True,
                                tags={"rockcls.model": cfg.model})
    bad = [(i, e) for i, e in enumerate(pred.errors) if e]
    try:
        tracking.set_description(run_id, describe_prediction(cfg, predictor, tta, len(pred.errors), len(bad)))
        log_data_input(run_id, index, cfg.data, content_fingerprint(index), context="inference")
        tracking.log_params(run_id, {**vars(cfg), "resolved_tta": tta, "num_models": len(predictor.models),
                                     "model_source": predictor.source})
        tracking.log_metrics(run_id, {"num_images": len(pred.errors), "num_errors": len(bad)})
        for path in files:
            tracking.log_file(run_id, path)
        if bad:
            tracking.log_text(run_id, "row\terror\n" + "".join(f"{i}\t{e}\n" for i, e in bad), "errors.tsv")
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id, "FINISHED")
    return run_id


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
        raise DataError(f"data: none of the {len(paths)} image(s) could be read; first: {bad[0][0]} ({bad[0][1]})")
    listing = "; ".join(f"{p} ({e})" for p, e in bad[:5])
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
    predictor = load_predictor(cfg.model, device=device)
    tta = predictor.tta if cfg.tta == "auto" else cfg.tta
    pred = predictor.predict(index.paths, tta=tta, batch_size=cfg.batch_size, device=device,
                             num_workers=cfg.num_workers)
    warn_errors(pred, index.paths)
    frame = build_submission(index.ids, pred, id_column=cfg.id_column, label_column=cfg.label_column)
    out = Path(cfg.out)
    npz = save_prediction(frame, pred, index.ids, index.paths, out, tta)
    run_id = log_prediction(cfg, pred, predictor, tta, [out, npz], index)
    print(f"predict run {run_id}: {len(frame)} row(s), {int((~pred.ok).sum())} unreadable, tta {tta} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
