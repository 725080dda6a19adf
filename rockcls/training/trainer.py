"""The k-fold training run: data -> split -> one MLflow parent run -> one child run per fold.

`run_training` is the one training function that the CLI, MLproject and the Optuna search call.
Each fold writes `last.pt` (everything needed to continue) after every epoch, atomically, so a
killed run continues with ``resume=<parent run id>`` from the last completed epoch."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm.utils
import torch
import yaml

from rockcls.core import gallery, names, tracking
from rockcls.core.config import (
    TrainConfig,
    build_config,
    command_flags,
    save_yaml,
)
from rockcls.core.devices import parse_devices
from rockcls.core.errors import ConfigError, RockclsError
from rockcls.core.metrics import confusion_figure, macro_f1, per_class_f1
from rockcls.core.text import utf8_escaped
from rockcls.data.cache import cache_settings
from rockcls.data.index import (
    DatasetIndex,
    content_fingerprint,
    index_dataset,
    make_folds,
    split_fingerprint,
)
from rockcls.data.sources import ImageDataset, open_source, validate_images
from rockcls.training.checkpoint import (
    load_checkpoint,
    load_weights,
    save_checkpoint,
    write_npz_atomic,
)
from rockcls.training import distributed
from rockcls.training.device import keep_freed_memory, resolve_amp, resolve_device, use_channels_last
from rockcls.training.distill import TeacherTargets, check_teacher_split, load_teacher
from rockcls.training.distributed import SINGLE, Dist, from_main
from rockcls.training.engine import (
    StepSettings,
    cosine_with_warmup,
    evaluate,
    train_one_epoch,
)
from rockcls.training.fold_runs import VIEW_PREFIX, find_fold_run, load_fold_result
from rockcls.training.models import build_model, build_model_with_report, model_spec, resolve_auto
from rockcls.training.parallel import run_folds_in_processes
from rockcls.training.sampling import HardNegativeMemory, MixtureBatchSampler
from rockcls.training.transforms import (
    DeviceAugment,
    build_device_augment,
    build_eval_transform,
    build_train_transform,
    tta_views,
)

log = logging.getLogger("rockcls")


EpochHook = Callable[[int, int, dict[str, float]], None]
FoldHook = Callable[[int, float], None]


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


@dataclass
class Plan:
    """Everything derived once from the config and the data; logged with the run."""

    cfg: TrainConfig
    index: DatasetIndex
    fold_of: np.ndarray
    device: torch.device
    amp_dtype: torch.dtype | None
    folds_to_run: list[int]
    derived: dict[str, Any]
    source: Any = None
    kind: str = "train"
    dist: Dist = SINGLE
    teacher: TeacherTargets | None = None  # distillation: the teacher's probabilities per fold


def load_dataset(cfg: TrainConfig) -> DatasetIndex:
    """The validated dataset; every problem of the data is reported at once, listed in
    ``<output_dir>/data_problems.tsv``."""
    index = index_dataset(cfg.data, check=False)
    cache = cache_settings(cfg)
    # With the cache on, validation's decode pass also fills it: each file is decoded once.
    return validate_images(index, skip_bad=cfg.skip_bad_images, cache_dir=cache.folder,
                           workers=cache.workers, cache_size=cache.size,
                           min_per_class=max(cfg.folds, 2), report=Path(cfg.output_dir) / "data_problems.tsv")


def build_plan(cfg: TrainConfig, dist: Dist = SINGLE, *, describe: bool = True) -> Plan:
    """The plan of ``cfg`` on this process (rank ``dist.rank`` of a torchrun job). ``describe``
    builds the model once to report what its weights gave it (rank 0 only). ``img_size`` 0 (auto)
    is resolved here, so ``plan.cfg`` is what trains."""
    cfg, auto = resolve_auto(cfg)
    if dist.active and cfg.devices:
        raise ConfigError("devices: folds in parallel processes and torchrun do not mix; leave devices "
                          "empty under torchrun (every rank trains every fold together)")
    parse_devices(cfg.devices)
    device = dist.place(resolve_device(cfg.device))
    if cfg.sync_bn and dist.active and device.type != "cuda":
        raise ConfigError("sync_bn: SyncBatchNorm works on GPUs only (PyTorch's DistributedDataParallel refuses "
                          "it on the CPU); leave sync_bn off for CPU ranks")
    index = load_dataset(cfg) if dist.main else None
    distributed.barrier(dist)  # rank 0 has validated and cached the data: the others read it warm
    index = index if index is not None else load_dataset(cfg)
    fold_of = make_folds(index.labels, folds=cfg.folds, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    if auto and describe and dist.main:
        log.info("chosen automatically: %s", auto)
    weights = describe_weights(cfg, len(index.classes)) if describe and dist.main else {}
    eff = cfg.batch_size * cfg.accumulation_steps * dist.world
    n_train = int((fold_of != 0).sum())
    n_hard = round(cfg.hn_ratio * eff) if cfg.hn_memory > 0 else 0
    derived = {
        "effective_batch_size": eff,
        "peak_lr": cfg.peak_lr(),
        "hard_negatives_per_step": n_hard,
        "balanced_per_step": round(cfg.balanced_ratio * (eff - n_hard)),
        "steps_per_epoch": max(1, n_train // eff),
        "num_images": len(index),
        "num_classes": len(index.classes),
        "num_skipped": len(index.skipped),
        "num_ignored_files": len(index.ignored),
        "data_fingerprint": content_fingerprint(index),
        "split_fingerprint": split_fingerprint(index, fold_of),
        "device": str(device),
        "world_size": dist.world,
        "amp_dtype": str(resolve_amp(cfg.amp, device)).replace("torch.", ""),
        **({"auto_chosen": auto} if auto else {}),
        **weights,
    }
    expected = from_main(dist, lambda: derived["split_fingerprint"])
    if expected != derived["split_fingerprint"]:
        raise RockclsError(f"rank {dist.rank}: the data under {cfg.data} differs from rank 0's (split "
                           f"fingerprint {derived['split_fingerprint']} != {expected}): every machine needs the same files")
    return Plan(cfg, index, fold_of, device, resolve_amp(cfg.amp, device),
                list(range(cfg.folds)), derived, dist=dist, teacher=load_plan_teacher(cfg, index, derived))


def load_plan_teacher(cfg: TrainConfig, index: DatasetIndex, derived: dict[str, Any]) -> TeacherTargets | None:
    """The teacher's cached probabilities in this run's row order, checked against its split."""
    if not cfg.teacher_file:
        if cfg.teacher:
            raise ConfigError("teacher: its probabilities are computed by `rockcls distill` (or `rockcls train "
                              "--teacher`), not here")
        return None
    targets = load_teacher(cfg.teacher_file)
    check_teacher_split(targets, split_fingerprint=derived["split_fingerprint"], classes=index.classes,
                        folds=cfg.folds, data=cfg.data)
    return targets.aligned(np.asarray(index.ids))


def describe_weights(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """Build the model once before any run opens: a bad backbone or weights source fails here, and
    what the pretrained weights gave the model is logged with the run."""
    _, report = build_model_with_report(cfg.backbone, num_classes, pretrained=cfg.pretrained,
                                        pretrained_path=cfg.pretrained_path, cache_dir=cache_settings(cfg).folder)
    if report is None:
        return {"init": "random"}
    log.info("pretrained weights: %s", report.summary())
    described = {"init": report.source, "init_tensors_loaded": f"{report.loaded}/{report.total} {report.matched_by}",
                 "init_reinitialised": ",".join(report.reinitialised) or "none"}
    if report.bn_eps is not None:
        described["init_bn_eps"] = report.bn_eps
    return described


def run_training(cfg: TrainConfig, *, parent_run_id: str | None = None, kind: str = "train",
                 tags: dict[str, str] | None = None, on_epoch_end: EpochHook | None = None,
                 on_fold_end: FoldHook | None = None, dist: Dist = SINGLE) -> TrainResult:
    """Train every fold of ``cfg`` (resuming ``cfg.resume`` if set) and return out-of-fold results.

    ``on_epoch_end(fold, epoch, metrics)`` is called after each logged epoch; it may raise to stop
    (`RunStopped`, e.g. a pruned trial, ends the runs as KILLED, anything else as FAILED).
    ``on_fold_end(fold, oof_macro_f1)`` is called after each fold's result is saved (a fold finished
    by an earlier attempt included), and may raise the same way.
    With ``cfg.devices`` the folds run concurrently in processes of their own
    (`rockcls.training.parallel`); under torchrun (``dist``) every rank trains each fold together
    and rank 0 alone tracks (`rockcls.training.distributed`).
    """
    if (cfg.devices or dist.active) and (on_epoch_end is not None or on_fold_end is not None):
        raise ConfigError("devices: an epoch or fold hook (a study's pruning) needs the folds in this process; "
                          "leave devices empty (the study runs one trial per device instead)")
    if cfg.resume:
        cfg = from_main(dist, lambda: resumed_config(cfg))
    plan = build_plan(cfg, dist)
    plan.kind = kind
    cfg = plan.cfg
    run_id = from_main(dist, lambda: open_train_run(plan, parent_run_id=parent_run_id, kind=kind, tags=tags))
    with closing_on_main(dist, run_id), system_metrics_on_main(dist, run_id, cfg, resume=bool(cfg.resume)):
        if cfg.devices:
            fold_results = run_folds_in_processes(cfg, run_id, plan.folds_to_run, parse_devices(cfg.devices))
        else:
            plan.source = open_source(plan.index, cfg=cfg)
            fold_results = {}
            for k in plan.folds_to_run:
                fold_results[k] = run_fold(plan, run_id, k, on_epoch_end)
                if on_fold_end is not None:
                    on_fold_end(k, float(fold_results[k]["score"]))
        if cfg.full_fit:
            plan.source = plan.source or open_source(plan.index, cfg=cfg)
            run_fold(plan, run_id, cfg.folds, None, kind="full")
        return from_main(dist, lambda: finish_train_run(plan, run_id, fold_results))


def system_metrics_on_main(dist: Dist, run_id: str, cfg: TrainConfig, *, label: str = "", resume: bool = False):
    """MLflow's system metrics on ``run_id`` from rank 0 (under torchrun the other ranks' machines
    are not sampled); ``label`` names a fold process's device when folds run in processes."""
    if not dist.main:
        return contextlib.nullcontext()
    return tracking.system_metrics(run_id, label=label, enabled=cfg.system_metrics, resume=resume)


def closing_on_main(dist: Dist, run_id: str):
    """`tracking.closing` on rank 0 (the only rank that tracks), nothing on the others."""
    return tracking.closing(run_id) if dist.main else contextlib.nullcontext(run_id)


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


def open_train_run(plan: Plan, *, parent_run_id: str | None, kind: str, tags: dict[str, str] | None) -> str:
    cfg = plan.cfg
    if cfg.resume:
        expected = tracking.get_run(cfg.resume).data.tags.get(names.SPLIT_FINGERPRINT)
        if expected != plan.derived["split_fingerprint"]:
            raise RockclsError(f"resume: the data under {cfg.data} changed since run {cfg.resume} "
                               f"started (split fingerprint {plan.derived['split_fingerprint']} != {expected})")
        tracking.reopen_run(cfg.resume)
        log.info("resuming run %s", cfg.resume)
        return cfg.resume
    run_tags = {names.DATA_FINGERPRINT: plan.derived["data_fingerprint"],
                names.SPLIT_FINGERPRINT: plan.derived["split_fingerprint"],
                names.BACKBONE: cfg.backbone, names.SEED: str(cfg.seed),
                names.SPLIT_SEED: str(cfg.split_seed),
                names.FOLDS: str(cfg.folds), **(tags or {})}
    run_id = tracking.start_run(experiment=cfg.experiment, name=f"{kind}-{cfg.backbone}", kind=kind,
                                parent_run_id=parent_run_id, tags=run_tags, adopt_env_run=parent_run_id is None)
    log_run_setup(plan, run_id)
    log_data_input(run_id, plan.index, cfg.data, plan.derived["data_fingerprint"], context="training")
    tracking.set_description(run_id, describe_train_run(plan, kind))
    log.info("run %s (%s)", run_id, tracking.run_location(run_id))
    return run_id


def log_data_input(run_id: str, index: DatasetIndex, data: str, fingerprint: str, *, context: str) -> None:
    """The dataset as the run's input: named after its folder, the content fingerprint as digest."""
    path = Path(data).resolve()
    profile: dict[str, Any] = {"num_images": len(index), "num_classes": len(index.classes)}
    if len(index) and (index.labels >= 0).all():
        counts = np.bincount(index.labels, minlength=len(index.classes))
        profile.update({f"images.{c}": int(n) for c, n in zip(index.classes, counts)})
    tracking.log_dataset(run_id, name=dataset_name(data), digest=fingerprint, source=str(path), profile=profile,
                         context=context)


def dataset_name(data: str) -> str:
    """The name a dataset input (and any metric linked to it) carries: the data's last two parts,
    "lithology/train", since the folder alone is often just "train"."""
    return "/".join(Path(data).resolve().parts[-2:])


def describe_train_run(plan: Plan, kind: str, score: float | None = None) -> str:
    """What the run is, its headline score and the command that repeats it (the run's description)."""
    cfg, index = plan.cfg, plan.index
    split = f"{cfg.folds} folds" if cfg.folds > 1 else f"one {cfg.val_fraction:g} holdout"
    world = int(plan.derived.get("world_size", 1))
    where = (f" Each fold on {world} ranks (torchrun), global batch {plan.derived['effective_batch_size']}."
             if world > 1 else f" Folds in parallel, one process each on `{cfg.devices}`." if cfg.devices else "")
    auto = plan.derived.get("auto_chosen")
    auto = f"\n\nChosen automatically: {auto}." if auto else ""  # a paragraph of its own: the page shows it
    if cfg.teacher:
        auto += (f"\n\nDistilled from `{cfg.teacher}` (temperature {cfg.temperature:g}, weight "
                 f"{cfg.distill_weight:g}): fold k learned from the teacher's fold-k networks only.")
    if cfg.full_fit:
        auto += "\n\nEnds with one network fitted on every image (child run `full`), the one the registry serves."
    what = (f"**{kind.capitalize()} run**: training of `{cfg.backbone}` on `{cfg.data}` ({len(index)} images, "
            f"{len(index.classes)} classes), {split} x {cfg.epochs} epochs at {cfg.img_size} px.{where}{auto}")
    result = (f"**cv_macro_f1 {score:.4f}**: macro-F1 of the out-of-fold predictions of every fold."
              if score is not None else "Running: cv_macro_f1 is logged when every fold has finished.")
    repeat = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()))
    launcher = f"torchrun --nproc-per-node {world} -m rockcls train" if world > 1 else "python -m rockcls train"
    command = " ".join([launcher, *command_flags(repeat, skip=("resume", "config"))])
    return (f"{what}\n\n{result}\n\nRepeat it:\n\n```\n{command}\n```\n\n"
            f"or `python -m rockcls train --config config.yaml` with this run's `config.yaml`.")


def log_run_setup(plan: Plan, run_id: str) -> None:
    params = {k: v for k, v in plan.cfg.to_dict().items() if k not in ("resume",)}
    conflicts = tracking.log_params(run_id, {**params, **plan.derived})
    if conflicts:
        log.warning("params %s were logged by `mlflow run` with other values; resolved values are "
                    "under resolved.<name>", ", ".join(conflicts))
    with tempfile.TemporaryDirectory() as tmp:
        save_yaml(plan.cfg, Path(tmp) / names.CONFIG_FILE)
        tracking.log_file(run_id, Path(tmp) / names.CONFIG_FILE)
        _write_split(plan, Path(tmp) / names.SPLIT_FILE)
        tracking.log_file(run_id, Path(tmp) / names.SPLIT_FILE)
    tracking.log_dict(run_id, {"classes": plan.index.classes}, names.CLASSES_FILE)
    if plan.teacher is not None:
        tracking.log_file(run_id, Path(plan.cfg.teacher_file), names.TEACHER_DIR)
    if plan.index.skipped:
        text = "\n".join(f"{utf8_escaped(p)}\t{utf8_escaped(r)}" for p, r in plan.index.skipped)
        tracking.log_text(run_id, f"path\treason\n{text}\n", "skipped_images.tsv")


def _write_split(plan: Plan, path: Path) -> None:
    import pandas as pd

    pd.DataFrame({"id": plan.index.ids, "label": [plan.index.classes[y] for y in plan.index.labels],
                  "fold": plan.fold_of}).to_csv(path, index=False)


def finish_train_run(plan: Plan, run_id: str, fold_results: dict[int, dict]) -> TrainResult:
    index, classes = plan.index, plan.index.classes
    logits = np.full((len(index), len(classes)), np.nan, dtype=np.float32)
    for res in fold_results.values():
        logits[res["rows"]] = res["logits"]
    scored = plan.fold_of >= 0
    preds = logits[scored].argmax(1)
    labels = index.labels[scored]
    score = macro_f1(labels, preds, len(classes))
    pcf = per_class_f1(labels, preds, classes)
    views = view_scores(plan, fold_results)
    tracking.log_metrics(run_id, {"cv_macro_f1": score, **{f"cv_f1.{safe_name(c)}": v for c, v in pcf.items()},
                                  **{f"cv_macro_f1.tta_{name}": v for name, (v, _) in views.items()}})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / names.OOF_LOGITS
        np.savez_compressed(path, ids=np.asarray(index.ids), paths=np.asarray(index.paths),
                            labels=index.labels, logits=logits, fold=plan.fold_of, classes=np.asarray(classes),
                            **{f"{VIEW_PREFIX}{name}": v for name, (_, v) in views.items()})
        tracking.log_file(run_id, path)
    tracking.log_figure(run_id, confusion_figure(labels, preds, classes, f"OOF macro-F1 {score:.4f}"),
                        "confusion_matrix.png")
    tracking.set_tags(run_id, {names.COMPLETE: "true"})
    tracking.set_description(run_id, describe_train_run(plan, plan.kind, score))
    shutil.rmtree(plan.cfg.run_dir(run_id), ignore_errors=True)
    log.info("cv_macro_f1 %.4f (%s)", score, ", ".join(f"{c} {v:.3f}" for c, v in pcf.items()))
    return TrainResult(run_id, score, pcf, classes, index.ids, index.labels, plan.fold_of, logits,
                       {k: r["score"] for k, r in fold_results.items()})


def view_scores(plan: Plan, fold_results: dict[int, dict]) -> dict[str, tuple[float, np.ndarray]]:
    """CV macro-F1 and OOF logits of each named view set inside the run's OOF views (none, flip,
    d4 from one d4 pass): how much accuracy fewer test-time views give up."""
    names_ = set.intersection(*(set(r.get("view_logits", {})) for r in fold_results.values())) if fold_results else set()
    out = {}
    scored = plan.fold_of >= 0
    for name in sorted(names_):
        logits = np.full((len(plan.index), len(plan.index.classes)), np.nan, dtype=np.float32)
        for res in fold_results.values():
            logits[res["rows"]] = res["view_logits"][name]
        out[name] = (macro_f1(plan.index.labels[scored], logits[scored].argmax(1), len(plan.index.classes)), logits)
    return out


def safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in name)


@dataclass
class FoldState:
    """Mutable state of a fold, saved in last.pt after every epoch."""

    epoch: int = 0
    step: int = 0
    best_f1: float = -1.0
    best_epoch: int = -1
    stale_epochs: int = 0  # epochs since best_epoch


def run_fold(plan: Plan, parent_id: str, fold: int, on_epoch_end: EpochHook | None, kind: str = "fold",
             label: str = "") -> dict:
    """Train one fold in its own child run, or collect it if a previous attempt finished it.

    ``kind`` full: the network fitted on every image (``fold`` = the number of folds), with the same
    recipe and epochs; nothing is held out, so it has no validation and no OOF logits. ``label``
    names this process's device in the fold run's system metrics (a fold process of --devices)."""
    dist = plan.dist
    fold_run, done = from_main(dist, lambda: find_fold_run(parent_id, fold, kind))
    if done:
        log.info("%s already finished in run %s: skipped", fold_label(fold, kind), fold_run)
        return from_main(dist, lambda: load_fold_result(fold_run)) if kind == "fold" else {}
    resumed = fold_run is not None
    fold_run = from_main(dist, lambda: open_fold_run(plan, parent_id, fold, fold_run, kind))
    with closing_on_main(dist, fold_run), system_metrics_on_main(dist, fold_run, plan.cfg, label=label,
                                                                 resume=resumed):
        return FoldTrainer(plan, parent_id, fold, fold_run).fit(on_epoch_end)


def fold_label(fold: int, kind: str = "fold") -> str:
    return "the network on every image" if kind == "full" else f"fold {fold}"


def open_fold_run(plan: Plan, parent_id: str, fold: int, fold_run: str | None, kind: str = "fold") -> str:
    if fold_run is not None:
        tracking.reopen_run(fold_run)
        return fold_run
    fold_run = tracking.start_run(experiment=plan.cfg.experiment, name="full" if kind == "full" else f"fold-{fold}",
                                  kind=kind, parent_run_id=parent_id, tags={names.FOLD: str(fold)})
    log_data_input(fold_run, plan.index, plan.cfg.data, plan.derived["data_fingerprint"], context="training")
    return fold_run


class FoldTrainer:
    """Builds the fold's loaders, model and optimizer, and runs its epochs.

    Under torchrun every rank builds one: the model is DistributedDataParallel (``self.net``), the
    sampler hands each rank its shard of the global batch, validation is sharded and gathered, and
    only rank 0 (``self.dist.main``) writes checkpoints and logs to MLflow."""

    def __init__(self, plan: Plan, parent_id: str, fold: int, run_id: str):
        self.plan, self.cfg, self.fold, self.run_id, self.parent_id = plan, plan.cfg, fold, run_id, parent_id
        self.dist = plan.dist
        self.dir = plan.cfg.run_dir(parent_id) / f"fold_{fold}"
        self.train_rows = np.flatnonzero(plan.fold_of != fold)
        self.val_rows = np.flatnonzero(plan.fold_of == fold)
        self.full = fold == self.cfg.folds  # the network on every image: nothing to validate
        self.label = fold_label(fold, "full" if self.full else "fold")
        keep_freed_memory()
        torch.manual_seed(self.cfg.seed * 100 + fold)
        model = build_model(self.cfg.backbone, len(plan.index.classes), pretrained=self.cfg.pretrained,
                            pretrained_path=self.cfg.pretrained_path,
                            cache_dir=cache_settings(self.cfg).folder).to(plan.device)
        if use_channels_last(plan.device):
            model = model.to(memory_format=torch.channels_last)
        self.net = distributed.wrap(model, self.dist, plan.device, sync_bn=self.cfg.sync_bn)
        self.model = distributed.unwrap(self.net)
        self.spec = model_spec(self.model, self.cfg.backbone, plan.index.classes, self.cfg.img_size, self.cfg.augment)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.ema = timm.utils.ModelEmaV3(self.model, decay=self.cfg.ema) if self.cfg.ema > 0 else None
        self.scaler = torch.amp.GradScaler("cuda") if plan.amp_dtype == torch.float16 else None
        self.memory = self._build_memory()
        self.sampler = MixtureBatchSampler(plan.index.labels[self.train_rows], batch_size=self.cfg.batch_size,
                                           accumulation_steps=self.cfg.accumulation_steps,
                                           hn_ratio=self.cfg.hn_ratio if self.memory else 0.0,
                                           balanced_ratio=self.cfg.balanced_ratio, memory=self.memory,
                                           seed=self.cfg.seed * 100 + fold, num_replicas=self.dist.world,
                                           rank=self.dist.rank)
        steps = len(self.sampler) // self.cfg.accumulation_steps
        self.lr_at = cosine_with_warmup(base_lr=self.cfg.peak_lr(), total_steps=steps * self.cfg.epochs,
                                        warmup_steps=int(round(self.cfg.warmup_epochs * steps)))
        self.settings = StepSettings(device=plan.device, mean=tuple(self.spec["mean"]), std=tuple(self.spec["std"]),
                                     accumulation_steps=self.cfg.accumulation_steps,
                                     label_smoothing=self.cfg.label_smoothing, grad_clip=self.cfg.grad_clip,
                                     amp_dtype=plan.amp_dtype, channels_last=use_channels_last(plan.device),
                                     temperature=self.cfg.temperature, distill_weight=self.cfg.distill_weight)
        self.teacher = None
        if plan.teacher is not None:  # fold k learns from the fold-k networks only (never saw fold k)
            self.teacher = torch.from_numpy(plan.teacher.scores(fold)[self.train_rows]).to(plan.device)
        self.train_loader, self.val_loader = self._build_loaders()
        self.state = FoldState()

    def _build_memory(self) -> HardNegativeMemory | None:
        if self.cfg.hn_ratio <= 0 or self.cfg.hn_memory <= 0:
            return None
        steps = max(1, len(self.train_rows) // self.plan.derived["effective_batch_size"])
        return HardNegativeMemory(self.cfg.hn_memory, len(self.train_rows), half_life=float(steps))

    def _build_loaders(self):
        cfg, plan, labels = self.cfg, self.plan, self.plan.index.labels
        train_ds = ImageDataset(plan.source, self.train_rows, labels[self.train_rows],
                                build_train_transform(cfg.augment, cfg.img_size))
        val_shard = distributed.shard(self.val_rows, self.dist)
        val_ds = ImageDataset(plan.source, val_shard, labels[val_shard], build_eval_transform(cfg.augment, cfg.img_size))
        common = {"num_workers": cfg.num_workers, "pin_memory": plan.device.type == "cuda",
                  "persistent_workers": cfg.num_workers > 0, "worker_init_fn": seed_worker}
        train = torch.utils.data.DataLoader(train_ds, batch_sampler=self.sampler, **common)
        val = torch.utils.data.DataLoader(val_ds, batch_size=cfg.batch_size * 2, shuffle=False, **common)
        return train, val

    # -- state

    def checkpoint(self, metrics: dict[str, float]) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "memory": self.memory.state_dict() if self.memory else None,
                "state": vars(self.state).copy(), "metrics": metrics, "spec": self.spec,
                "fold": self.fold}

    def restore(self) -> None:
        """Continue from last.pt, as rank 0 reads it (under torchrun it is sent to every rank)."""
        last = self.dir / "last.pt"
        ck = from_main(self.dist, lambda: load_checkpoint(last, map_location="cpu") if last.is_file() else None)
        if ck is None:
            return
        try:
            load_weights(self.model, ck["model"], last)
            load_weights(self.optimizer, ck["optimizer"], last, "optimizer")
            for what, part in (("ema", self.ema), ("scaler", self.scaler), ("memory", self.memory)):
                if part is not None and ck[what] is not None:
                    load_weights(part, ck[what], last, what)
            self.state = FoldState(**ck["state"])
        except (KeyError, TypeError) as exc:
            what = f"no {exc} entry" if isinstance(exc, KeyError) else str(exc).splitlines()[0][:160]
            raise RockclsError(f"checkpoint {last} cannot be resumed from ({what}); move it aside to "
                               f"train fold {self.fold} again from its first epoch") from None
        if self.dist.main and self.state.epoch - 1 not in tracking.metric_steps(self.run_id, "val_macro_f1"):
            tracking.log_metrics(self.run_id, ck["metrics"], step=self.state.epoch - 1)
        log.info("fold %d: resumed after epoch %d (best macro-F1 %.4f)", self.fold, self.state.epoch - 1,
                 self.state.best_f1)

    # -- epochs

    def fit(self, on_epoch_end: EpochHook | None) -> dict:
        self.restore()
        while self.state.epoch < self.cfg.epochs and not self._early_stopped():
            metrics = self.run_epoch(self.state.epoch)
            if on_epoch_end is not None and self.dist.main:
                on_epoch_end(self.fold, self.state.epoch - 1, metrics)
        return self.finish()

    def _early_stopped(self) -> bool:
        patience = self.cfg.early_stop
        return patience > 0 and self.state.stale_epochs >= patience

    def run_epoch(self, epoch: int) -> dict[str, float]:
        # Under torchrun each rank draws its own augmentation and dropout; one process as before.
        rank = self.dist.rank
        key = (self.cfg.seed, self.fold, epoch, rank) if self.dist.active else (self.cfg.seed, self.fold, epoch)
        torch.manual_seed(hash(key) % 2**31)
        self.sampler.set_epoch(epoch)
        if self.cfg.num_workers == 0:  # seed_worker only runs in worker processes
            self.train_loader.dataset.transform.set_random_seed(hash(key) % 2**32)
        augment = DeviceAugment(build_device_augment(self.cfg.augment), seed=self.cfg.seed * 1000 + epoch + 7919 * rank)
        tr = train_one_epoch(self.net, self.train_loader, self.optimizer, self.settings, lr_at=self.lr_at,
                             start_step=self.state.step, augment=augment, memory=self.memory, ema=self.ema,
                             scaler=self.scaler, desc=f"{self.label} epoch {epoch}", dist=self.dist,
                             teacher=self.teacher)
        ev = None if self.full else distributed.gather_eval(self.dist, evaluate(
            self.ema.module if self.ema else self.model, self.val_loader, self.settings, desc=f"{self.label} val"))
        metrics = self._epoch_metrics(tr, ev)
        if ev is not None:
            self._track_best(epoch, metrics["val_macro_f1"])
        self.state.epoch, self.state.step = epoch + 1, tr["steps"]
        if not self.dist.main:
            return metrics
        save_checkpoint(self.checkpoint(metrics), self.dir / "last.pt")
        self._drop_stale_best()
        tracking.log_metrics(self.run_id, metrics, step=epoch)
        self._log_epoch_galleries(epoch, ev)
        shown = f" val_loss {metrics['val_loss']:.4f} val_macro_f1 {metrics['val_macro_f1']:.4f}" if ev else ""
        log.info("%s epoch %d: train_loss %.4f%s", self.label, epoch, metrics["train_loss"], shown)
        return metrics

    def _epoch_metrics(self, tr: dict, ev: dict | None) -> dict[str, float]:
        metrics = {"train_loss": tr["train_loss"], "lr": tr["lr"], "train_images_per_s": tr["train_images_per_s"],
                   "hn_memory_size": float(len(self.memory)) if self.memory else 0.0, **self._memory_counts()}
        if ev is None:
            return metrics
        classes = self.plan.index.classes
        preds = ev["logits"].argmax(1)
        pcf = per_class_f1(ev["labels"], preds, classes)
        return {**metrics, "val_loss": ev["val_loss"], "val_macro_f1": macro_f1(ev["labels"], preds, len(classes)),
                **{f"val_f1.{safe_name(c)}": v for c, v in pcf.items()}}

    def _memory_counts(self) -> dict[str, float]:
        """How many members of each class the hard-negative memory holds (``hn_memory.count.<class>``)."""
        if self.memory is None:
            return {}
        classes = self.plan.index.classes
        counts = np.bincount(self.plan.index.labels[self.train_rows[self.memory.ids()]], minlength=len(classes))
        return {f"hn_memory.count.{safe_name(c)}": float(n) for c, n in zip(classes, counts)}

    def _log_epoch_galleries(self, epoch: int, ev: dict | None) -> None:
        """Every ``gallery_every`` epochs the epoch's highest-loss validation images; then and at the
        fold's last epoch the memory's highest-loss members."""
        size, every = self.cfg.gallery_size, self.cfg.gallery_every
        due = size > 0 and every > 0 and (epoch + 1) % every == 0
        last = self.state.epoch >= self.cfg.epochs or self._early_stopped()
        index = self.plan.index
        if due and ev is not None:
            rows = self.val_rows[ev["positions"]]
            examples = gallery.hardest(rows, ev["logits"], ev["labels"], paths=index.paths, classes=index.classes, n=size)
            gallery.log_gallery(self.run_id, self.plan.source, examples, key=names.HARDEST_VAL, step=epoch,
                                table_file=f"{names.GALLERY_DIR}/{names.HARDEST_VAL}_epoch_{epoch}.csv")
        if self.memory is not None and size > 0 and (due or last):
            rows = self.train_rows[self.memory.ids()]
            examples = gallery.highest(rows, self.memory.losses(), index.labels[rows], paths=index.paths,
                                       classes=index.classes, n=size)
            gallery.log_gallery(self.run_id, self.plan.source, examples, key=names.HN_MEMORY, step=epoch,
                                table_file=f"{names.GALLERY_DIR}/{names.HN_MEMORY}_epoch_{epoch}.csv")

    def _track_best(self, epoch: int, f1: float) -> None:
        if f1 <= self.state.best_f1:
            self.state.stale_epochs += 1
            return
        self.state.best_f1, self.state.best_epoch, self.state.stale_epochs = f1, epoch, 0
        if self.cfg.select == "best" and self.dist.main:
            # Named by epoch: last.pt records which one is current, so a kill between the two
            # writes leaves a resume with the pair last.pt says (the newer file is dropped).
            weights = (self.ema.module if self.ema else self.model).state_dict()
            save_checkpoint({"model": weights}, self._best_path(epoch))

    def _best_path(self, epoch: int) -> Path:
        return self.dir / f"best-{epoch}.pt"

    def _drop_stale_best(self) -> None:
        keep = self._best_path(self.state.best_epoch).name
        for path in self.dir.glob("best-*.pt"):
            if path.name != keep:
                path.unlink(missing_ok=True)

    def finish(self) -> dict:
        """Evaluate the kept weights (with the OOF test-time views), save and log the fold's result.

        Everything here is derived from last.pt (and the best checkpoint it names), so a kill at any
        point of this method is repaired by running it again on resume.
        """
        if self.full:
            return self._finish_full()
        kept = self.ema.module if self.ema else self.model
        kept_epoch = self.state.epoch - 1
        if self.cfg.select == "best":
            best = self._best_path(self.state.best_epoch)
            load_weights(kept, from_main(self.dist, lambda: load_checkpoint(best, "cpu")).get("model"), best)
            kept_epoch = self.state.best_epoch
        ev = distributed.gather_eval(self.dist, evaluate(kept, self.val_loader, self.settings, desc=f"fold {self.fold} oof",
                                                         views=tta_views(self.cfg.tta)))
        score = macro_f1(ev["labels"], ev["logits"].argmax(1), len(self.plan.index.classes))
        rows = self.val_rows[ev["positions"]]
        views = ev.get("view_logits", {})
        result = {"rows": rows, "logits": ev["logits"], "score": score, "view_logits": views}
        if not self.dist.main:
            return result
        save_checkpoint({"model": kept.state_dict(), "spec": {**self.spec, "tta": self.cfg.tta},
                         "classes": self.spec["classes"], "epoch": kept_epoch, "oof_macro_f1": score, "fold": self.fold},
                        self.dir / "model.pt")
        oof = self.dir / names.OOF_FOLD
        write_npz_atomic(oof, rows=rows, logits=ev["logits"], score=np.float64(score),
                         **{f"{VIEW_PREFIX}{name}": v for name, v in views.items()})
        tracking.log_file(self.run_id, self.dir / "model.pt", "checkpoints")
        tracking.log_file(self.run_id, oof)
        if self.cfg.gallery_size > 0:
            index = self.plan.index
            examples = gallery.hardest(rows, ev["logits"], ev["labels"], paths=index.paths, classes=index.classes,
                                       n=self.cfg.gallery_size)
            gallery.log_gallery(self.run_id, self.plan.source, examples, key=names.HARDEST_OOF, step=kept_epoch,
                                table_file=f"{names.GALLERY_DIR}/{names.HARDEST_OOF}.csv",
                                image_file=f"{names.GALLERY_DIR}/{names.HARDEST_OOF}.png")
        tracking.log_metrics(self.run_id, {"oof_macro_f1": score, "best_val_macro_f1": self.state.best_f1,
                                           "best_epoch": float(self.state.best_epoch),
                                           "kept_epoch": float(kept_epoch)})
        tracking.set_tags(self.run_id, {names.COMPLETE: "true"})
        tracking.set_description(self.run_id, (
            f"Fold {self.fold} of train run `{self.parent_id}`: trained on {len(self.train_rows)} images, validated "
            f"on {len(self.val_rows)}. Kept epoch {kept_epoch} (select={self.cfg.select}): **OOF macro-F1 "
            f"{score:.4f}** (tta {self.cfg.tta}); per-epoch curves in Model metrics."))
        log.info("fold %d: kept epoch %d, OOF macro-F1 %.4f (tta %s)", self.fold, kept_epoch, score, self.cfg.tta)
        shutil.rmtree(self.dir, ignore_errors=True)
        return result

    def _finish_full(self) -> dict:
        """The network on every image keeps its last epoch (nothing was held out to pick another)."""
        if not self.dist.main:
            return {}
        kept = self.ema.module if self.ema else self.model
        save_checkpoint({"model": kept.state_dict(), "spec": {**self.spec, "tta": self.cfg.tta},
                         "classes": self.spec["classes"], "epoch": self.state.epoch - 1, "fold": self.fold},
                        self.dir / "model.pt")
        tracking.log_file(self.run_id, self.dir / "model.pt", "checkpoints")
        tracking.set_tags(self.run_id, {names.COMPLETE: "true"})
        tracking.set_description(self.run_id, (
            f"The network of train run `{self.parent_id}` fitted on all {len(self.train_rows)} images with the "
            f"recipe and {self.cfg.epochs} epochs of its folds. Nothing was held out: its expected accuracy is "
            f"the parent's cv_macro_f1. `ensemble` and the registry serve it instead of the "
            f"{self.cfg.folds} fold networks (one forward pass per view instead of {self.cfg.folds})."))
        log.info("the network on every image: trained %d epochs on %d images", self.state.epoch, len(self.train_rows))
        shutil.rmtree(self.dir, ignore_errors=True)
        return {}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.peak_lr())
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.peak_lr())
    return torch.optim.SGD(groups, lr=cfg.peak_lr(), momentum=0.9, nesterov=True)


def seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own, reproducible augmentation stream."""
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    np.random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
