"""Prediction with a train run's fold checkpoints or a registered ensemble, with test-time augmentation.

Every model (fold checkpoint, ensemble member) turns a batch into softmax probabilities; these are
averaged over TTA views and models (weighted for an ensemble). The "logits" that prediction
returns and saves are the log of that average plus the ensemble's per-class bias (zero for a train
run): the argmax of those scores is the predicted class, and their softmax is the reported
probability. The ensemble search (``rockcls.runs.ensemble``) scores its weights with the same rule.

An image that cannot be read is never given a default class: its row keeps an empty label, NaN
scores and the reason in ``error``, and the command warns naming it (it fails if none is readable)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rockcls.core.errors import ConfigError, DataError, RockclsError, first_line
from rockcls.core.progress import track
from rockcls.data.images import MIN_SIDE
from rockcls.data.sources import FileSource
from rockcls.training.checkpoint import load_checkpoint, load_weights
from rockcls.training.device import resolve_amp, resolve_device, use_channels_last
from rockcls.training.engine import StepSettings, autocast, prepare_batch
from rockcls.training.models import build_model_from_spec
from rockcls.training.transforms import (
    TTA_VIEWS,
    build_eval_transform,
    dihedral,
    tta_views,
)

TTA_CHOICES = ("auto", *TTA_VIEWS)


ModelSpec = tuple[torch.nn.Module, dict[str, Any]]


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

    Training rejects or skips the same images (`rockcls.data.images.check_image`); here the row stays,
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
        if use_channels_last(device):
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
                         channels_last=use_channels_last(device))
        xn = prepare_batch(x, s)
        for v in views:
            with autocast(s):
                logits = model(dihedral(xn, v))
            out += torch.softmax(logits.float(), dim=1) * (wt / len(views))
    return out.cpu().numpy().astype(np.float64)


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
    models = [load_model(path, device) for path in paths]
    classes = {tuple(spec["classes"]) for _, spec in models}
    if len(classes) > 1:
        raise RockclsError(f"checkpoints disagree on the class names: {sorted(classes)}")
    return models


def load_model(path: str | Path, device: str | torch.device = "cpu") -> ModelSpec:
    """One checkpoint's model. Its weights are matched against the model its spec describes, built
    on the meta device (no memory), before the real one is built: a forged spec or head is refused
    in one line instead of allocating what it claims."""
    ck = load_checkpoint(path)
    spec = _checked_spec(ck, path)
    try:
        with torch.device("meta"):
            expected = {k: tuple(t.shape) for k, t in build_model_from_spec(spec).state_dict().items()}
    except RockclsError as exc:
        raise RockclsError(f"checkpoint {path}: {exc}") from None
    except (RuntimeError, ValueError, TypeError) as exc:
        raise RockclsError(f"checkpoint {path}: cannot build its {spec['backbone']!r} model "
                           f"({first_line(exc, 160)})") from None
    found = {k: tuple(t.shape) for k, t in ck["model"].items()}
    wrong = sorted(set(expected) ^ set(found)) or sorted(k for k in expected if expected[k] != found[k])
    if wrong:
        k = wrong[0]
        raise RockclsError(f"checkpoint {path}: its weights do not match its spec ({spec['backbone']}, "
                           f"{spec['num_classes']} classes): {k} is {_shape(found.get(k))} in the file, "
                           f"{_shape(expected.get(k))} in the model ({len(wrong)} such tensor(s))")
    model = build_model_from_spec(spec)
    load_weights(model, ck["model"], path)
    return model.to(device).eval(), spec


def _shape(shape: tuple[int, ...] | None) -> str:
    return "missing" if shape is None else "x".join(map(str, shape)) or "a scalar"


def _checked_spec(ck: dict[str, Any], path: str | Path) -> dict[str, Any]:
    spec, weights = ck.get("spec"), ck.get("model")
    if not isinstance(spec, dict) or not isinstance(weights, dict):
        raise RockclsError(f"checkpoint {path} lacks model weights or spec (not a rockcls model.pt)")
    classes, n = spec.get("classes"), spec.get("num_classes")
    problem = next((what for what, bad in (
        ("backbone", not isinstance(spec.get("backbone"), str)),
        ("classes", not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)),
        ("num_classes", not isinstance(n, int) or not isinstance(classes, list) or n != len(classes) or n < 1),
        ("img_size", not isinstance(spec.get("img_size"), int) or spec["img_size"] < 1),
        ("augment", not isinstance(spec.get("augment"), str)),
        ("mean", not _numbers(spec.get("mean"))),
        ("std", not _numbers(spec.get("std"))),
    ) if bad), "")
    if problem:
        shown = repr(spec.get(problem))
        raise RockclsError(f"checkpoint {path}: its spec has an invalid {problem} "
                           f"({shown[:80] + '...' if len(shown) > 80 else shown}"
                           f"{f' for {len(classes)} class names' if problem == 'num_classes' and isinstance(classes, list) else ''})")
    return spec


def _numbers(values: Any) -> bool:
    return isinstance(values, list) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values)
