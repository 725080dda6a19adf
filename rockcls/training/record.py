"""The MLflow record of a train run: its parent run (params, config, split, dataset input,
description, the OOF result at the end), its fold runs (opened, then their result logged), and
the rank-0 rule under torchrun. The training loop computes; this module writes what it computed."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rockcls.core import gallery, names, system_metrics, tracking
from rockcls.core.config import TrainConfig, build_config, command_flags, config_text
from rockcls.core.errors import RockclsError
from rockcls.core.metrics import confusion_figure, macro_f1, per_class_f1, safe_name
from rockcls.core.text import utf8_escaped
from rockcls.data.index import DatasetIndex
from rockcls.training.distributed import Dist
from rockcls.training.fold_runs import VIEW_PREFIX
from rockcls.training.plan import Plan

log = logging.getLogger("rockcls")


@dataclass
class TrainResult:
    run_id: str
    cv_macro_f1: float
    per_class_f1: dict[str, float]
    classes: list[str]
    ids: list[str]
    labels: np.ndarray
    fold_of: np.ndarray
    oof_logits: np.ndarray
    fold_scores: dict[int, float] = field(default_factory=dict)


# ----------------------------------------------------------------- rank 0 tracks

def closing_on_main(dist: Dist, run_id: str):
    """`tracking.closing` on rank 0 (the only rank that tracks), nothing on the others."""
    return tracking.closing(run_id) if dist.main else contextlib.nullcontext(run_id)


def system_metrics_on_main(dist: Dist, run_id: str, cfg: TrainConfig, *, label: str = "", resume: bool = False):
    """MLflow's system metrics on ``run_id`` from rank 0 (under torchrun the other ranks' machines
    are not sampled); ``label`` names a fold process's device when folds run in processes."""
    if not dist.main:
        return contextlib.nullcontext()
    return system_metrics.system_metrics(run_id, label=label, enabled=cfg.system_metrics, resume=resume)


# ----------------------------------------------------------------- the parent run

def resumed_config(cfg: TrainConfig) -> TrainConfig:
    """The config of the interrupted run (its config.yaml), so the resumed run is the same run."""
    run = tracking.get_run(cfg.resume)
    if run.data.tags.get(names.KIND) not in ("train", "trial"):
        raise RockclsError(f"resume: run {cfg.resume} is not a train run")
    if run.info.status == "FINISHED":
        raise RockclsError(f"resume: run {cfg.resume} already finished; nothing to resume")
    saved = yaml.safe_load(tracking.download(cfg.resume, names.CONFIG_FILE).read_text())
    saved["resume"] = cfg.resume
    saved["config"] = ""
    saved["devices"] = cfg.devices  # where the folds run is this command's choice, not the run's
    saved["teacher_file"] = cfg.teacher_file or saved.get("teacher_file", "")  # this machine's copy
    return build_config(TrainConfig, saved)


def check_run_split(plan: Plan, run_id: str, who: str) -> None:
    """``plan``'s data is the data train run ``run_id`` started on (a resume, a fold process)."""
    expected = tracking.get_run(run_id).data.tags.get(names.SPLIT_FINGERPRINT)
    plan.check_split(expected, who, f"run {run_id} started on")


def open_train_run(plan: Plan, *, parent_run_id: str | None, tags: dict[str, str] | None) -> str:
    """The train run: reopened when resuming, else started with its tags, params, files and description."""
    cfg = plan.cfg
    if cfg.resume:
        check_run_split(plan, cfg.resume, "resume")
        tracking.reopen_run(cfg.resume)
        log.info("resuming run %s", cfg.resume)
        return cfg.resume
    run_tags = {names.DATA_FINGERPRINT: plan.derived["data_fingerprint"], names.SPLIT_FINGERPRINT: plan.split_fingerprint,
                names.BACKBONE: cfg.backbone, names.SEED: str(cfg.seed), names.SPLIT_SEED: str(cfg.split_seed),
                names.FOLDS: str(cfg.folds), **(tags or {})}
    run_id = tracking.start_run(experiment=cfg.experiment, name=f"{plan.kind}-{cfg.backbone}", kind=plan.kind,
                                parent_run_id=parent_run_id, tags=run_tags, adopt_env_run=parent_run_id is None)
    conflicts = tracking.update_run(run_id, run_setup(plan))
    if conflicts:
        log.warning("params %s were logged by `mlflow run` with other values; resolved values are "
                    "under resolved.<name>", ", ".join(conflicts))
    log.info("run %s (%s)", run_id, tracking.run_location(run_id))
    return run_id


def run_setup(plan: Plan) -> tracking.RunUpdate:
    """What a new train run starts with: params (the config and what the plan derived), config.yaml,
    split.csv, classes, the teacher file of a distilled run, the skipped images, the dataset input
    and the description."""
    cfg, index = plan.cfg, plan.index
    setup = tracking.RunUpdate(
        params={**{k: v for k, v in cfg.to_dict().items() if k != "resume"}, **plan.derived},
        texts={names.CONFIG_FILE: config_text(cfg), names.SPLIT_FILE: split_table(plan)},
        dicts={names.CLASSES_FILE: {"classes": index.classes}},
        datasets=[data_input(index, cfg.data, plan.derived["data_fingerprint"], context="training")],
        description=describe_train_run(plan))
    if plan.teacher is not None:
        setup.files.append((Path(cfg.teacher_file), names.TEACHER_DIR))
    if index.skipped:
        text = "\n".join(f"{utf8_escaped(p)}\t{utf8_escaped(r)}" for p, r in index.skipped)
        setup.texts[names.SKIPPED_FILE] = f"path\treason\n{text}\n"
    return setup


def split_table(plan: Plan) -> str:
    """split.csv: each image's id, label and fold."""
    import pandas as pd

    return pd.DataFrame({"id": plan.index.ids, "label": [plan.index.classes[y] for y in plan.index.labels],
                         "fold": plan.fold_of}).to_csv(index=False)


def log_data_input(run_id: str, index: DatasetIndex, data: str, fingerprint: str, *, context: str) -> None:
    """The dataset as the run's input (`data_input`)."""
    tracking.log_dataset(run_id, **data_input(index, data, fingerprint, context=context))


def data_input(index: DatasetIndex, data: str, fingerprint: str, *, context: str) -> dict[str, Any]:
    """A dataset input (`tracking.log_dataset` keywords): named after its folder, the content
    fingerprint as digest, the image count per class as profile."""
    profile: dict[str, Any] = {"num_images": len(index), "num_classes": len(index.classes)}
    if len(index) and (index.labels >= 0).all():
        counts = np.bincount(index.labels, minlength=len(index.classes))
        profile.update({f"images.{c}": int(n) for c, n in zip(index.classes, counts)})
    return {"name": dataset_name(data), "digest": fingerprint, "source": str(Path(data).resolve()),
            "profile": profile, "context": context}


def dataset_name(data: str) -> str:
    """The name a dataset input (and any metric linked to it) carries: the data's last two parts,
    "lithology/train", since the folder alone is often just "train"."""
    return "/".join(Path(data).resolve().parts[-2:])


def describe_train_run(plan: Plan, score: float | None = None) -> str:
    """What the run is, its headline score and the command that repeats it (the run's description)."""
    cfg, index = plan.cfg, plan.index
    split = f"{cfg.folds} folds" if cfg.folds > 1 else f"one {cfg.val_fraction:g} holdout"
    world = plan.dist.world
    where = (f" Each fold on {world} ranks (torchrun), global batch {plan.batches.effective_batch_size}."
             if world > 1 else f" Folds in parallel, one process each on `{cfg.devices}`." if cfg.devices else "")
    auto = plan.derived.get("auto_chosen")
    auto = f"\n\nChosen automatically: {auto}." if auto else ""  # a paragraph of its own: the page shows it
    if cfg.teacher:
        auto += (f"\n\nDistilled from `{cfg.teacher}` (temperature {cfg.temperature:g}, weight "
                 f"{cfg.distill_weight:g}): fold k learned from the teacher's fold-k networks only.")
    if cfg.full_fit:
        auto += "\n\nEnds with one network fitted on every image (child run `full`), the one the registry serves."
    what = (f"**{plan.kind.capitalize()} run**: training of `{cfg.backbone}` on `{cfg.data}` ({len(index)} images, "
            f"{len(index.classes)} classes), {split} x {cfg.epochs} epochs at {cfg.img_size} px.{where}{auto}")
    result = (f"**cv_macro_f1 {score:.4f}**: macro-F1 of the out-of-fold predictions of every fold."
              if score is not None else "Running: cv_macro_f1 is logged when every fold has finished.")
    repeat = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()))
    launcher = f"torchrun --nproc-per-node {world} -m rockcls train" if world > 1 else "python -m rockcls train"
    command = " ".join([launcher, *command_flags(repeat, skip=("resume", "config"))])
    return (f"{what}\n\n{result}\n\nRepeat it:\n\n```\n{command}\n```\n\n"
            f"or `python -m rockcls train --config config.yaml` with this run's `config.yaml`.")


def finish_train_run(plan: Plan, run_id: str, fold_results: dict[int, dict]) -> TrainResult:
    """The out-of-fold result of every fold, scored and logged (metrics, logits, confusion matrix,
    the complete tag and the final description); the run's local files are removed."""
    index, classes = plan.index, plan.index.classes
    logits = oof_matrix(plan, fold_results, lambda res: res["logits"])
    scored = plan.fold_of >= 0
    preds = logits[scored].argmax(1)
    labels = index.labels[scored]
    score = macro_f1(labels, preds, len(classes))
    pcf = per_class_f1(labels, preds, classes)
    views = view_scores(plan, fold_results)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / names.OOF_LOGITS
        np.savez_compressed(path, ids=np.asarray(index.ids), paths=np.asarray(index.paths),
                            labels=index.labels, logits=logits, fold=plan.fold_of, classes=np.asarray(classes),
                            **{f"{VIEW_PREFIX}{name}": v for name, (_, v) in views.items()})
        tracking.update_run(run_id, tracking.RunUpdate(
            metrics={"cv_macro_f1": score, **{f"cv_f1.{safe_name(c)}": v for c, v in pcf.items()},
                     **{f"cv_macro_f1.tta_{name}": v for name, (v, _) in views.items()}},
            files=[(path, None)], tags={names.COMPLETE: "true"}, description=describe_train_run(plan, score),
            figures={names.CONFUSION_FIGURE: confusion_figure(labels, preds, classes, f"OOF macro-F1 {score:.4f}")}))
    log.info("cv_macro_f1 %.4f (%s)", score, ", ".join(f"{c} {v:.3f}" for c, v in pcf.items()))
    return TrainResult(run_id, score, pcf, classes, index.ids, index.labels, plan.fold_of, logits,
                       {k: r["score"] for k, r in fold_results.items()})


def oof_matrix(plan: Plan, fold_results: dict[int, dict], part) -> np.ndarray:
    """One row of logits per image (NaN where no fold scored it), each fold's ``part`` in its rows."""
    logits = np.full((len(plan.index), len(plan.index.classes)), np.nan, dtype=np.float32)
    for res in fold_results.values():
        logits[res["rows"]] = part(res)
    return logits


def view_scores(plan: Plan, fold_results: dict[int, dict]) -> dict[str, tuple[float, np.ndarray]]:
    """CV macro-F1 and OOF logits of each named view set inside the run's OOF views (none, flip,
    d4 from one d4 pass): how much accuracy fewer test-time views give up."""
    names_ = set.intersection(*(set(r.get("view_logits", {})) for r in fold_results.values())) if fold_results else set()
    out = {}
    scored = plan.fold_of >= 0
    for name in sorted(names_):
        logits = oof_matrix(plan, fold_results, lambda res: res["view_logits"][name])
        out[name] = (macro_f1(plan.index.labels[scored], logits[scored].argmax(1), len(plan.index.classes)), logits)
    return out


# ----------------------------------------------------------------- fold runs

def open_fold_run(plan: Plan, parent_id: str, fold: int, fold_run: str | None, kind: str = "fold") -> str:
    """The fold's run: reopened when an earlier attempt started it, else started under the parent."""
    if fold_run is not None:
        tracking.reopen_run(fold_run)
        return fold_run
    fold_run = tracking.start_run(experiment=plan.cfg.experiment, name="full" if kind == "full" else f"fold-{fold}",
                                  kind=kind, parent_run_id=parent_id, tags={names.FOLD: str(fold)})
    tracking.update_run(fold_run, tracking.RunUpdate(
        datasets=[data_input(plan.index, plan.cfg.data, plan.derived["data_fingerprint"], context="training")]))
    return fold_run


def log_epoch(plan: Plan, run_id: str, epoch: int, metrics: dict[str, float], galleries: dict[str, list]) -> None:
    """An epoch of a fold: its metrics on step ``epoch`` and its galleries (key -> examples)."""
    tracking.log_metrics(run_id, metrics, step=epoch)
    for key, examples in galleries.items():
        gallery.log_gallery(run_id, plan.source, examples, key=key, step=epoch,
                            table_file=f"{names.GALLERY_DIR}/{key}_epoch_{epoch}.csv")


def log_missing_epoch(run_id: str, epoch: int, metrics: dict[str, float]) -> None:
    """A resumed fold's last saved epoch, if the kill came between its checkpoint and its metrics."""
    if epoch not in tracking.metric_steps(run_id, "val_macro_f1"):
        tracking.log_metrics(run_id, metrics, step=epoch)


# The weights a fold run keeps: written locally under this file name, logged into this folder, so
# readers find them at `names.FOLD_MODEL`.
FOLD_MODEL_FOLDER, FOLD_MODEL_NAME = str(Path(names.FOLD_MODEL).parent), Path(names.FOLD_MODEL).name


def log_fold_result(plan: Plan, run_id: str, parent_id: str, fold: int, *, model: Path, oof: Path,
                    examples: list | None, metrics: dict[str, float], kept_epoch: int, train_images: int,
                    val_images: int) -> None:
    """A finished fold: its kept weights, OOF logits, hardest OOF images, scores, the complete tag
    and a description that says which epoch it kept."""
    cfg, score = plan.cfg, metrics["oof_macro_f1"]
    if examples is not None:
        gallery.log_gallery(run_id, plan.source, examples, key=names.HARDEST_OOF, step=kept_epoch,
                            table_file=f"{names.GALLERY_DIR}/{names.HARDEST_OOF}.csv",
                            image_file=f"{names.GALLERY_DIR}/{names.HARDEST_OOF}.png")
    tracking.update_run(run_id, tracking.RunUpdate(
        files=[(model, FOLD_MODEL_FOLDER), (oof, None)], metrics=metrics, tags={names.COMPLETE: "true"},
        description=(f"Fold {fold} of train run `{parent_id}`: trained on {train_images} images, validated "
                     f"on {val_images}. Kept epoch {kept_epoch} (select={cfg.select}): **OOF macro-F1 "
                     f"{score:.4f}** (tta {cfg.tta}); per-epoch curves in Model metrics.")))
    log.info("fold %d: kept epoch %d, OOF macro-F1 %.4f (tta %s)", fold, kept_epoch, score, cfg.tta)


def log_full_result(plan: Plan, run_id: str, parent_id: str, *, model: Path, images: int, epochs_run: int) -> None:
    """The network fitted on every image: its weights, the complete tag and what it is for."""
    cfg = plan.cfg
    tracking.update_run(run_id, tracking.RunUpdate(
        files=[(model, FOLD_MODEL_FOLDER)], tags={names.COMPLETE: "true"},
        description=(f"The network of train run `{parent_id}` fitted on all {images} images with the "
                     f"recipe and {cfg.epochs} epochs of its folds. Nothing was held out: its expected accuracy "
                     f"is the parent's cv_macro_f1. `ensemble` and the registry serve it instead of the "
                     f"{cfg.folds} fold networks (one forward pass per view instead of {cfg.folds}).")))
    log.info("the network on every image: trained %d epochs on %d images", epochs_run, images)
