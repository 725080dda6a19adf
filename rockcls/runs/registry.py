"""The registered ensemble: an MLflow pyfunc model that holds every member's fold checkpoints.

MLflow model-registry and pyfunc calls live here (run tracking stays in `rockcls.core.tracking`). The
model is logged as models-from-code (MLflow 3.17 refuses to unpickle a PythonModel by default)
with the rockcls package as its code path, so ``mlflow.pyfunc.load_model("models:/NAME@champion")``
and ``mlflow models serve`` need only the registry URI and the pinned pip requirements.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from packaging.version import Version

from rockcls.core import names, store, tracking
from rockcls.core.errors import RockclsError, first_line
from rockcls.inference.predictor import Predictor, load_models
from rockcls.inference.serving import (B64_COLUMN, MODEL_CONFIG, PATH_COLUMN, PixelBudget, RequestExpired,
                                      build_serve_limits, parse_batch_size, predict_request)
from rockcls.runs.ensemble import EnsembleFit
from rockcls.runs.lookup import download_full_checkpoint, download_run_checkpoints
from rockcls.training.device import resolve_device
from rockcls.training.transforms import tta_views

log = logging.getLogger("rockcls")

CHAMPION = "champion"
DEFAULT_BATCH = 32
# What `import rockcls.registry` pulls in, pinned to the installed versions (mlflow adds itself).
SERVING_PACKAGES = ("torch", "torchvision", "timm", "albumentations", "opencv-python-headless", "numpy",
                    "pandas", "pillow", "pyyaml", "scikit-learn", "tqdm")
MODEL_CODE = '''"""MLflow models-from-code entry of a rockcls ensemble (written by rockcls.runs.registry)."""
from mlflow.models import set_model

from rockcls.runs.registry import RockclsModel

set_model(RockclsModel())
'''
# One line per paragraph or item: the MLflow UI renders a single newline as a line break.
MODEL_NOTE = """rockcls image classifier. Each version is a weighted soft-voting ensemble of k-fold train runs (every fold checkpoint of every member with a weight, or each member's one network fitted on every image: tag `rockcls.networks`), made by `rockcls ensemble --register` or an Optuna study.

* Load: `mlflow.pyfunc.load_model("models:/{name}@champion")`, or serve it with `mlflow models serve -m models:/{name}@champion`.
* Input: a DataFrame with `image_b64` (base64 images) and/or `img_path` (read only under an image root configured where the model runs: ROCKCLS_IMAGE_ROOT or model_config image_root; refused otherwise).
* Output: `label`, one `prob_<class>` column per class, and `error` for images that could not be read.
* `@champion` moves only to a version with a higher honest (cross-fitted) macro-F1, tag `rockcls.macro_f1`.
"""


# ---------------------------------------------------------------------------- the pyfunc model

class RockclsModel(mlflow.pyfunc.PythonModel):
    """Predicts a DataFrame of base64 image bytes (``image_b64``) or, when an image root is
    configured, image paths under it (``img_path``).

    Returns ``label``, one ``prob_<class>`` column per class and ``error`` (empty when the image
    was read; otherwise the reason, with an empty label and NaN probabilities).
    """

    def load_context(self, context) -> None:
        manifest = json.loads(Path(context.artifacts["ensemble"]).read_text())
        self.limits = build_serve_limits(getattr(context, "model_config", None))
        self.budget = PixelBudget(self.limits.decode_pixels)  # one per server process
        self.predictor = build_predictor(manifest, context.artifacts)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            return self._predict(model_input, params or {})
        except RequestExpired as exc:
            log.warning("request stopped: %s", exc)
            raise MlflowException(str(exc), error_code=DEADLINE_EXCEEDED) from None
        except RockclsError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        except Exception as exc:  # noqa: BLE001 - the client gets one line, the server log the traceback
            log.exception("predict failed")
            raise MlflowException(f"internal error while predicting ({type(exc).__name__}); see the server log",
                                  error_code=INTERNAL_ERROR) from None

    def _predict(self, model_input: Any, params: dict[str, Any]) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        tta = str(params.get("tta") or self.predictor.tta)
        tta_views(tta)
        batch_size = parse_batch_size(params.get("batch_size", DEFAULT_BATCH))
        return predict_request(self.predictor, frame, self.limits, self.budget, tta=tta, batch_size=batch_size)


def build_predictor(manifest: dict[str, Any], artifacts: dict[str, str], device: str = "auto") -> Predictor:
    """Rebuild every member's fold models, each weighted by its member's weight / its fold count."""
    dev = resolve_device(device)
    models, weights = [], []
    for member in manifest["members"]:
        if not member["checkpoints"]:
            continue
        fold_models = load_models([artifacts[key] for key in member["checkpoints"]], device=dev)
        models += fold_models
        weights += [member["weight"] / len(fold_models)] * len(fold_models)
    classes = list(manifest["classes"])
    bias = np.asarray([manifest["bias"][c] for c in classes], dtype=np.float64)
    return Predictor(models, weights, classes, bias, tta=manifest["tta"], source="ensemble")


def load_registered_predictor(uri: str) -> Predictor:
    """The Predictor inside a logged or registered rockcls model (``models:/NAME@alias`` etc.)."""
    try:
        model = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as exc:
        raise RockclsError(f"model: cannot load {uri} from {store.shown_uri()}: "
                           f"{first_line(exc)}") from None
    try:
        inner = model.unwrap_python_model()
    except MlflowException:
        inner = None
    if not isinstance(inner, RockclsModel):
        kind = type(inner).__name__ if inner is not None else "not a Python model"
        raise RockclsError(f"model: {uri} is not a rockcls ensemble model ({kind})")
    inner.predictor.source = uri
    return inner.predictor


# ---------------------------------------------------------------------------- logging the model

def pip_requirements() -> list[str]:
    """Installed versions, pinned without local suffixes (``+cu130``) so they install from PyPI."""
    reqs = []
    for pkg in SERVING_PACKAGES:
        try:
            reqs.append(f"{pkg}=={Version(importlib.metadata.version(pkg)).public}")
        except importlib.metadata.PackageNotFoundError:
            raise RockclsError(f"register: package {pkg} is not installed; it is needed to serve the model") from None
    return reqs


def build_signature(classes: list[str], tta: str) -> ModelSignature:
    inputs = Schema([ColSpec("string", PATH_COLUMN, required=False), ColSpec("string", B64_COLUMN, required=False)])
    outputs = Schema([ColSpec("string", "label"), *[ColSpec("double", f"prob_{c}") for c in classes],
                      ColSpec("string", "error")])
    params = ParamSchema([ParamSpec("tta", "string", tta), ParamSpec("batch_size", "long", DEFAULT_BATCH)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def build_input_example() -> pd.DataFrame:
    """A self-contained example (a grey PNG as base64): MLflow predicts it when logging the model."""
    ok, png = cv2.imencode(".png", np.full((32, 32, 3), 128, dtype=np.uint8))
    return pd.DataFrame({B64_COLUMN: [base64.b64encode(png.tobytes()).decode("ascii")]})


def pack_ensemble(fit: EnsembleFit, tta: str, workdir: Path, networks: str = "folds"
                  ) -> tuple[dict[str, Any], dict[str, str]]:
    """The manifest (ensemble.json) and the artifact files: every fold checkpoint of each member
    with a non-zero weight (a zero-weight member cannot change a prediction), or with ``networks``
    full each member's one network fitted on every image (``train --full-fit``)."""
    artifacts: dict[str, str] = {}
    members = []
    for i, (run_id, name, weight) in enumerate(zip(fit.run_ids, fit.names, fit.weights)):
        keys = []
        if weight > 0 and networks == "full":
            path = download_full_checkpoint(run_id, workdir / f"member{i}")
            if path is None:
                raise RockclsError(f"register: train run {run_id} has no network fitted on every image "
                                   f"(train it with --full-fit, or register its folds: networks=folds)")
            keys.append(f"member{i}_full")
            artifacts[keys[-1]] = str(path.rename(workdir / f"{keys[-1]}.pt"))
        elif weight > 0:
            for k, path in enumerate(download_run_checkpoints(run_id, workdir / f"member{i}")):
                keys.append(f"member{i}_fold{k}")
                artifacts[keys[-1]] = str(path.rename(workdir / f"{keys[-1]}.pt"))
        members.append({"run_id": run_id, "name": name, "weight": float(weight), "checkpoints": keys,
                        "oof_macro_f1": fit.member_scores[run_id]})
    manifest = {"format": 1, "classes": list(fit.classes), "tta": tta, "members": members, "networks": networks,
                "bias": {c: float(v) for c, v in zip(fit.classes, fit.bias)},
                "decision": "argmax(log(sum_m w_m mean_folds,views softmax) + bias)",
                "scores": fit.to_dict()["scores"], "split": dict(fit.split)}
    manifest_path = workdir / names.ENSEMBLE_FILE
    manifest_path.write_text(json.dumps(manifest, indent=2))
    artifacts["ensemble"] = str(manifest_path)
    return manifest, artifacts


def log_ensemble_model(fit: EnsembleFit, *, run_id: str, tta: str, name: str = "", networks: str = "folds"):
    """Log the pyfunc model as an output of ``run_id``, in that run's experiment, named ``name``
    (default: the ensemble's name); returns MLflow's ModelInfo.

    The logged model is created first in the run's experiment: without an active run MLflow would
    file it under the active experiment (Default), away from the run that made it.
    """
    tta_views(tta)
    run = tracking.get_run(run_id)
    model = mlflow.initialize_logged_model(
        name=name or fit.name, source_run_id=run_id, experiment_id=run.info.experiment_id,
        model_type="rockcls-ensemble", params=dict(run.data.params),
        # context tags first: the Models tab's "Logged from" names the command, not __main__.py
        tags={**tracking.context_tags(), names.MEMBERS: ",".join(fit.run_ids), names.STRATEGY: fit.strategy,
              names.TTA: tta, names.NETWORKS: networks})
    with tempfile.TemporaryDirectory(prefix="rockcls-model-") as tmp:
        work = Path(tmp)
        _, artifacts = pack_ensemble(fit, tta, work, networks)
        code = work / "code" / "rockcls"
        shutil.copytree(Path(__file__).parents[1], code,  # the whole rockcls package
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        model_file = work / "rockcls_model.py"
        model_file.write_text(MODEL_CODE)
        return mlflow.models.Model.log(
            name=model.name, artifact_path=None, flavor=mlflow.pyfunc, run_id=run_id, model_id=model.model_id,
            python_model=str(model_file),
            artifacts=artifacts, code_paths=[str(code)], signature=build_signature(list(fit.classes), tta),
            input_example=build_input_example(), pip_requirements=pip_requirements(), model_config=dict(MODEL_CONFIG))


# ---------------------------------------------------------------------------- registry

@dataclass
class Registration:
    name: str
    version: str
    model_uri: str
    score: float
    champion: bool
    reason: str

    def summary(self) -> str:
        state = "is now @champion" if self.champion else "not champion"
        return f"registered {self.name} version {self.version} (macro-F1 {self.score:.4f}): {state} ({self.reason})"


def register_ensemble(fit: EnsembleFit, *, name: str, run_id: str, tta: str = "none", force: bool = False,
                      networks: str = "folds") -> Registration:
    """Log the ensemble as a pyfunc model, register a new version of ``name``, maybe move @champion."""
    info = log_ensemble_model(fit, run_id=run_id, tta=tta, networks=networks)
    # Full precision (repr): the champion comparison reads the score back from this tag.
    tags = {names.SCORE: repr(float(fit.score)), "rockcls.insample_macro_f1": repr(float(fit.insample_score)),
            "rockcls.equal_weight_macro_f1": repr(float(fit.equal_weight_score)), names.ENSEMBLE_RUN: run_id,
            names.MEMBERS: ",".join(fit.run_ids), names.STRATEGY: fit.strategy, names.TTA: tta,
            names.NETWORKS: networks, names.SPLIT_FINGERPRINT: fit.split.get(names.SPLIT_FINGERPRINT, "")}
    version = mlflow.register_model(info.model_uri, name, tags=tags).version
    moved, reason = update_champion(name, str(version), fit.score, force=force)
    tracking.set_tags(run_id, {names.MODEL_URI: info.model_uri, names.REGISTERED_MODEL: name,
                               names.MODEL_VERSION: str(version), names.CHAMPION: str(moved).lower()})
    reg = Registration(name, str(version), f"models:/{name}/{version}", fit.score, moved, reason)
    describe_registration(fit, reg, run_id=run_id, tta=tta, networks=networks)
    log.info("%s", reg.summary())
    return reg


def describe_registration(fit: EnsembleFit, reg: Registration, *, run_id: str, tta: str,
                          networks: str = "folds") -> None:
    """Descriptions of the version, of the registered model (when it has none) and a line on the run."""
    client = MlflowClient()
    state = "@champion" if reg.champion else "not champion"
    # Score and alias first: the versions table previews only the start of a description.
    client.update_model_version(reg.name, reg.version, description=(
        f"**Honest macro-F1 {fit.score:.4f}** (cross-fitted), {state}: {reg.reason}. Ensemble `{fit.name}` of "
        f"{len(fit.run_ids)} train runs ({', '.join(fit.names)}), rule **{fit.strategy}**, TTA {tta}, "
        f"{'one network per member (fitted on every image)' if networks == 'full' else 'every fold network'}; best member "
        f"{fit.best_member_score:.4f}, equal weights {fit.equal_weight_score:.4f}. Made by ensemble run `{run_id}`."))
    if not client.get_registered_model(reg.name).description:
        client.update_registered_model(reg.name, description=MODEL_NOTE.format(name=reg.name))
    note = tracking.get_run(run_id).data.tags.get(names.NOTE, "")
    tracking.set_description(run_id, f"{note}\n\nLogged as model `{fit.name}` (this experiment's Models tab) and "
                                     f"registered as `{reg.name}` version {reg.version}: {state} ({reg.reason}).")


def champion_score(name: str) -> tuple[str | None, float | None]:
    """(version, score tag) of the current champion; (None, None) when there is none."""
    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    try:
        return str(current.version), float(current.tags[names.SCORE])
    except (KeyError, ValueError):
        return str(current.version), None


def update_champion(name: str, version: str, score: float, *, force: bool = False) -> tuple[bool, str]:
    """Point @champion at ``version`` if it beats the current champion's score (or ``force``)."""
    old_version, old_score = champion_score(name)
    if old_version is None:
        reason = "first champion"
    elif force:
        reason = f"forced over version {old_version}"
    elif old_score is None:
        return False, f"champion version {old_version} has no {names.SCORE} tag to compare; use force to replace it"
    elif score > old_score:
        reason = f"beats version {old_version} ({score:.4f} > {old_score:.4f})"
    else:
        return False, f"does not beat version {old_version} ({score:.4f} <= {old_score:.4f})"
    MlflowClient().set_registered_model_alias(name, CHAMPION, version)
    return True, reason
