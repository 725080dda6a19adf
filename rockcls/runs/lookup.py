"""Finding train runs in the tracking store and loading their fold checkpoints as a predictor."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from rockcls.core import names, tracking
from rockcls.core.errors import ConfigError, RockclsError
from rockcls.inference.predictor import Predictor, load_models

TRAIN_KINDS = ("train", "trial")


RUN_ID = re.compile(r"[0-9a-f]{32}")


def check_train_run(run_id: str) -> Any:
    """The run, if it is a completed train (or trial) run; a one-line error otherwise."""
    run = tracking.get_run(run_id)
    kind = run.data.tags.get(names.KIND)
    if kind not in TRAIN_KINDS:
        raise RockclsError(f"run {run_id} is a {kind or 'untagged'} run, not a train run")
    if run.data.tags.get(names.COMPLETE) != "true":
        raise RockclsError(f"train run {run_id} did not complete (status {run.info.status}); "
                           f"resume it or use another run")
    return run


def download_run_checkpoints(run_id: str, dst: str | Path) -> list[Path]:
    """The model.pt of every fold of a completed train run (downloaded under ``dst``), in fold order."""
    run = check_train_run(run_id)
    folds = [r for r in tracking.child_runs(run_id, kind="fold") if r.data.tags.get(names.COMPLETE) == "true"]
    folds.sort(key=lambda r: int(r.data.tags.get(names.FOLD, "0")))
    expected = int(run.data.tags.get(names.FOLDS, len(folds)))
    if not folds or len(folds) != expected:
        raise RockclsError(f"train run {run_id}: found {len(folds)} finished fold run(s), expected {expected}")
    return [tracking.download(r.info.run_id, names.FOLD_MODEL, str(Path(dst) / f"fold_{k}"))
            for k, r in enumerate(folds)]


def download_full_checkpoint(run_id: str, dst: str | Path) -> Path | None:
    """The model.pt of a train run's network fitted on every image (``--full-fit``), or None."""
    full = [r for r in tracking.child_runs(run_id, kind="full") if r.data.tags.get(names.COMPLETE) == "true"]
    if not full:
        return None
    return tracking.download(full[0].info.run_id, names.FOLD_MODEL, str(Path(dst) / "full"))


def has_full_network(run_id: str) -> bool:
    return any(r.data.tags.get(names.COMPLETE) == "true" for r in tracking.child_runs(run_id, kind="full"))


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
