"""The teacher of a distilled run: which ensemble it is, and its probabilities, computed once.

A teacher is named as users name models: ``models:/NAME@alias`` or ``models:/NAME/VERSION`` (a
registered rockcls ensemble), an ensemble run id, or a train run id (one member, weight 1). For
every fold k its members' fold-k checkpoints predict every image with the teacher's test-time
views; `rockcls.training.distill` documents the cached file. The cache is keyed by the members,
weights, bias and views, so a second student of the same teacher (another backbone, a resumed
run, a trial) reads it instead of predicting again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rockcls.core import names, store, tracking
from rockcls.core.config import TrainConfig
from rockcls.core.errors import ConfigError, DataError, RockclsError, first_line
from rockcls.core.metrics import softmax
from rockcls.data.cache import resolve_cache_dir
from rockcls.data.index import index_dataset
from rockcls.data.sources import FileSource
from rockcls.inference.predictor import load_models, predict_logits
from rockcls.runs.ensemble import check_same_split, load_member
from rockcls.runs.lookup import RUN_ID, TRAIN_KINDS, download_run_checkpoints
from rockcls.training.distill import TeacherTargets, load_teacher, save_teacher
from rockcls.training.record import resumed_config
from rockcls.training.transforms import tta_views

log = logging.getLogger("rockcls")

TEACHER_FORMS = "models:/NAME@alias, models:/NAME/VERSION, an ensemble run id or a train run id"


@dataclass
class TeacherSpec:
    """The ensemble a teacher reference names: members with weights, bias and test-time views."""

    ref: str
    run_ids: list[str]
    weights: list[float]
    bias: np.ndarray
    classes: list[str]
    tta: str
    source_run: str

    def key(self) -> str:
        rule = {"runs": self.run_ids, "weights": [round(w, 8) for w in self.weights],
                "bias": [round(float(b), 8) for b in self.bias], "tta": self.tta}
        return hashlib.sha1(json.dumps(rule, sort_keys=True).encode()).hexdigest()[:16]


def resolve_teacher(ref: str) -> TeacherSpec:
    """The ensemble behind ``ref``; one line when it names nothing rockcls can teach with."""
    ref = ref.strip()
    if ref.startswith("models:/"):
        run_id, tta = _registered(ref)
        spec = _from_run(run_id, ref)  # reads the ensemble run's manifest once
        return dataclasses.replace(spec, tta=tta or spec.tta)
    run_id = ref[len("runs:/"):].strip("/").split("/")[0] if ref.startswith("runs:/") else ref
    if not RUN_ID.fullmatch(run_id):
        raise ConfigError(f"teacher: expected {TEACHER_FORMS}; got {ref!r}")
    return _from_run(run_id, ref)


def _registered(ref: str) -> tuple[str, str]:
    """(ensemble run id, views) of a registered version ``models:/NAME@alias`` or ``models:/NAME/VERSION``."""
    body = ref[len("models:/"):]
    client = MlflowClient()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = body.partition("/")
            version = client.get_model_version(name, number)
    except MlflowException as exc:
        raise ConfigError(f"teacher: cannot find {ref} in {store.shown_uri()}: "
                          f"{first_line(exc, 160)}") from None
    run_id = version.tags.get(names.ENSEMBLE_RUN)
    if not run_id:
        raise ConfigError(f"teacher: {ref} is not a rockcls ensemble model (no {names.ENSEMBLE_RUN} tag)")
    return run_id, version.tags.get(names.TTA, "")


def _from_run(run_id: str, ref: str) -> TeacherSpec:
    run = tracking.get_run(run_id)
    kind = run.data.tags.get(names.KIND)
    if kind in TRAIN_KINDS:
        member = load_member(run_id)
        return TeacherSpec(ref, [run_id], [1.0], np.zeros(len(member.classes)), member.classes, member.tta, run_id)
    if kind != "ensemble":
        raise ConfigError(f"teacher: run {run_id} is a {kind or 'untagged'} run; expected {TEACHER_FORMS}")
    fit = json.loads(tracking.download(run_id, names.ENSEMBLE_FILE).read_text())
    members = [m for m in fit["members"] if m["weight"] > 0]  # a zero weight cannot change a prediction
    classes = list(fit["classes"])
    tta = tracking.param(run, "tta", "none")
    tta_views(tta)
    return TeacherSpec(ref, [m["run_id"] for m in members], [float(m["weight"]) for m in members],
                       np.asarray([fit["bias"][c] for c in classes], dtype=np.float64), classes, tta, run_id)


def teacher_path(cfg: TrainConfig, spec: TeacherSpec) -> Path:
    return resolve_cache_dir(cfg.cache_dir) / "teachers" / f"{spec.key()}.npz"


def compute_teacher(spec: TeacherSpec, data: str, *, device: str = "auto", batch_size: int = 64,
                    num_workers: int = 0) -> TeacherTargets:
    """Every fold's mixture of the members' probabilities over every image of the teacher's split.

    The images are read from ``data`` (the student's copy of the teacher's data, matched by id)."""
    members = [load_member(r) for r in spec.run_ids]
    check_same_split(members)
    first = members[0]
    folds = int(first.tags.get(names.FOLDS, "0") or 0)
    if folds < 1:
        raise RockclsError(f"teacher: run {first.run_id} has no {names.FOLDS} tag")
    index = index_dataset(data, check=False)
    where = dict(zip(index.ids, index.paths))
    missing = [str(i) for i in first.ids if str(i) not in where]
    if missing:
        raise ConfigError(f"teacher: {len(missing)} image(s) of the teacher's split are not under {data} "
                          f"(first {missing[0]!r}); distil on the teacher's data")
    paths = np.asarray([where[str(i)] for i in first.ids])
    mix = np.zeros((folds, len(first.ids), len(spec.classes)), dtype=np.float64)
    start = time.perf_counter()
    for member, weight in zip(members, spec.weights):
        with tempfile.TemporaryDirectory(prefix="rockcls-teacher-") as tmp:
            checkpoints = download_run_checkpoints(member.run_id, tmp)
            for k, checkpoint in enumerate(checkpoints):
                own = first.fold == k  # fold k's own rows: the member's OOF predictions already are them
                mix[k, own] += weight * softmax(member.logits[own].astype(np.float64))
                rows = np.flatnonzero(~own)
                logits, errors = predict_logits(load_models([checkpoint]), FileSource(list(paths[rows])),
                                                tta=spec.tta, batch_size=batch_size, device=device,
                                                num_workers=num_workers, desc=f"teacher {member.name} fold {k}")
                bad = [(paths[rows[i]], e) for i, e in enumerate(errors) if e]
                if bad:
                    raise DataError(f"teacher: {bad[0][0]}: {bad[0][1]} ({len(bad)} unreadable image(s))")
                mix[k, rows] += weight * softmax(logits.astype(np.float64))
                log.info("teacher: member %s fold %d predicted %d images (tta %s)", member.name, k, len(rows), spec.tta)
    total = float(sum(spec.weights))
    meta = {"teacher": spec.ref, "source_run": spec.source_run, "members": spec.run_ids, "weights": spec.weights,
            "tta": spec.tta, "split_fingerprint": first.tags.get(names.SPLIT_FINGERPRINT, ""),
            "seconds": round(time.perf_counter() - start, 1)}
    return TeacherTargets(first.ids, first.fold.astype(np.int64), mix / total, spec.bias, spec.classes, meta)


def prepare_teacher(cfg: TrainConfig, *, batch_size: int = 64) -> TrainConfig:
    """``cfg`` with ``teacher_file`` set: the cached probabilities of ``cfg.teacher``, computed
    now if no earlier run of this teacher left them (a resumed run reads its teacher and data from
    its own config)."""
    if cfg.resume:  # the interrupted run's own config: its teacher, data, folds and teacher views
        cfg = resumed_config(cfg)
    if not cfg.teacher:
        raise ConfigError(f"teacher: distill needs a teacher: {TEACHER_FORMS}")
    spec = resolve_teacher(cfg.teacher)
    if cfg.teacher_tta != "auto":
        spec = dataclasses.replace(spec, tta=cfg.teacher_tta)
    check_split_settings(spec, cfg)
    path = teacher_path(cfg, spec)
    if path.is_file():
        log.info("teacher %s: cached probabilities %s (computed in %.0f s)", cfg.teacher, path,
                 load_teacher(path).meta.get("seconds", 0))
        return dataclasses.replace(cfg, teacher_file=str(path))
    log.info("teacher %s: %d member(s), tta %s; predicting every image with each fold's networks once",
             cfg.teacher, len(spec.run_ids), spec.tta)
    targets = compute_teacher(spec, cfg.data, device=cfg.device, batch_size=batch_size, num_workers=cfg.num_workers)
    save_teacher(path, targets)
    log.info("teacher: probabilities cached in %s (%.0f s)", path, targets.meta["seconds"])
    return dataclasses.replace(cfg, teacher_file=str(path))


def check_split_settings(spec: TeacherSpec, cfg: TrainConfig) -> None:
    """Folds and split seed must be the teacher's before anything is predicted (the split itself,
    data included, is compared by fingerprint when the student's run is planned)."""
    tags = tracking.get_run(spec.run_ids[0]).data.tags
    theirs = (tags.get(names.FOLDS, ""), tags.get(names.SPLIT_SEED, ""))
    if theirs != (str(cfg.folds), str(cfg.split_seed)):
        raise ConfigError(f"teacher: {spec.ref} was trained with folds {theirs[0]}, split_seed {theirs[1]}; this run "
                          f"has folds {cfg.folds}, split_seed {cfg.split_seed}: give the teacher's (the student's fold k "
                          f"must be the fold its fold-k networks never saw)")
