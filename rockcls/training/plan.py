"""The plan of a train run: the validated data, its split, the device, the cache and batch
settings, and every figure derived from them. Built once per process from the config, before any
run opens; logged with the run; read by every fold."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rockcls.core.config import TrainConfig
from rockcls.core.devices import parse_devices
from rockcls.core.errors import ConfigError, RockclsError
from rockcls.data.cache import CacheSettings, cache_settings
from rockcls.data.index import DatasetIndex, content_fingerprint, index_dataset
from rockcls.data.folds import make_folds, split_fingerprint
from rockcls.data.sources import open_source, validate_images
from rockcls.training import distributed
from rockcls.training.device import resolve_amp, resolve_device
from rockcls.training.distill import TeacherTargets, check_teacher_split, load_teacher
from rockcls.training.distributed import SINGLE, Dist, from_main
from rockcls.training.models import build_model_with_report, enable_grad_checkpointing, param_groups, resolve_auto
from rockcls.training.sampling import BatchComposition

log = logging.getLogger("rockcls")


@dataclass
class Plan:
    """Everything derived once from the config and the data; logged with the run."""

    cfg: TrainConfig
    index: DatasetIndex
    fold_of: np.ndarray
    device: torch.device
    amp_dtype: torch.dtype | None
    cache: CacheSettings
    batches: BatchComposition
    derived: dict[str, Any]
    kind: str = "train"  # train, trial (a study's), or what a caller names it
    dist: Dist = SINGLE
    teacher: TeacherTargets | None = None  # distillation: the teacher's probabilities per fold

    @property
    def folds_to_run(self) -> list[int]:
        return list(range(self.cfg.folds))

    @property
    def split_fingerprint(self) -> str:
        return self.derived["split_fingerprint"]

    @functools.cached_property
    def source(self):
        """What the folds read images from (the cache, built on first use, or the files): opened in
        the process that trains, never in one that only hands folds to others."""
        return open_source(self.index, self.cache)

    def check_split(self, expected: str | None, who: str, against: str) -> None:
        """The one check that this process's data is the data ``against`` names (the split
        fingerprint ``expected``): a resumed run, a fold process and a torchrun rank all make it."""
        if expected != self.split_fingerprint:
            raise RockclsError(f"{who}: the data under {self.cfg.data} is not the data {against} (split fingerprint "
                               f"{self.split_fingerprint} != {expected}): every fold of a run needs the same files")


def train_cache_settings(cfg: TrainConfig) -> CacheSettings:
    """A train run's cache: decode threads are twice its loader workers, at least 4."""
    return cache_settings(img_size=cfg.img_size, cache_size=cfg.cache_size, cache_dir=cfg.cache_dir,
                          workers=max(4, 2 * cfg.num_workers), enabled=cfg.cache)


def load_dataset(cfg: TrainConfig, cache: CacheSettings | None = None) -> DatasetIndex:
    """The validated dataset; every problem of the data is reported at once, listed in
    ``<output_dir>/data_problems.tsv``. ``cache``: the run's cache settings (default: resolved from ``cfg``)."""
    cache = cache or train_cache_settings(cfg)
    index = index_dataset(cfg.data, check=False)
    # With the cache on, validation's decode pass also fills it: each file is decoded once.
    return validate_images(index, skip_bad=cfg.skip_bad_images, cache_dir=cache.folder,
                           workers=cache.workers, cache_size=cache.size,
                           min_per_class=max(cfg.folds, 2), report=Path(cfg.output_dir) / "data_problems.tsv")


def build_plan(cfg: TrainConfig, dist: Dist = SINGLE, *, kind: str = "train", describe: bool = True) -> Plan:
    """The plan of ``cfg`` on this process (rank ``dist.rank`` of a torchrun job). ``describe``
    builds the model once to report what its weights gave it (rank 0 only). ``img_size`` and
    ``lr`` 0 (auto) are resolved here, so ``plan.cfg`` is what trains."""
    cfg, auto = resolve_auto(cfg)
    check_placement(cfg, dist)
    device = dist.place(resolve_device(cfg.device))
    cache = train_cache_settings(cfg)
    index = load_dataset(cfg, cache) if dist.main else None
    distributed.barrier(dist)  # rank 0 has validated and cached the data: the others read it warm
    index = index if index is not None else load_dataset(cfg, cache)
    fold_of = make_folds(index.labels, folds=cfg.folds, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    if auto and describe and dist.main:
        log.info("chosen automatically: %s", auto)
    batches = BatchComposition(cfg.batch_size, cfg.accumulation_steps, dist.world,
                               hn_ratio=cfg.hn_ratio if cfg.hn_memory > 0 else 0.0, balanced_ratio=cfg.balanced_ratio)
    weights = describe_weights(cfg, len(index.classes), cache) if describe and dist.main else {}
    derived = {
        **batches.report(int((fold_of != 0).sum())),
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
    plan = Plan(cfg, index, fold_of, device, resolve_amp(cfg.amp, device), cache, batches, derived, kind=kind,
                dist=dist)
    plan.check_split(from_main(dist, lambda: plan.split_fingerprint), f"rank {dist.rank}", "rank 0 has")
    # the teacher is checked against the split only once the split is known to be every rank's
    return dataclasses.replace(plan, teacher=load_plan_teacher(cfg, index, plan.split_fingerprint))


def check_placement(cfg: TrainConfig, dist: Dist) -> None:
    """Where the folds run: processes of their own (``devices``) or torchrun ranks, not both."""
    if dist.active and cfg.devices:
        raise ConfigError("devices: folds in parallel processes and torchrun do not mix; leave devices "
                          "empty under torchrun (every rank trains every fold together)")
    parse_devices(cfg.devices)
    if cfg.sync_bn and dist.active and resolve_device(cfg.device).type != "cuda":
        raise ConfigError("sync_bn: SyncBatchNorm works on GPUs only (PyTorch's DistributedDataParallel refuses "
                          "it on the CPU); leave sync_bn off for CPU ranks")


def load_plan_teacher(cfg: TrainConfig, index: DatasetIndex, split: str) -> TeacherTargets | None:
    """The teacher's cached probabilities in ``index``'s row order, checked against the split."""
    if not cfg.teacher_file:
        if cfg.teacher:
            raise ConfigError("teacher: its probabilities are computed by `rockcls distill` (or `rockcls train "
                              "--teacher`), not here")
        return None
    targets = load_teacher(cfg.teacher_file)
    check_teacher_split(targets, split_fingerprint=split, classes=index.classes, folds=cfg.folds, data=cfg.data)
    return targets.aligned(np.asarray(index.ids))


def describe_weights(cfg: TrainConfig, num_classes: int, cache: CacheSettings) -> dict[str, Any]:
    """Build the model once before any run opens: a bad backbone or weights source fails here, and
    what the pretrained weights gave the model is logged with the run."""
    model, report = build_model_with_report(cfg.backbone, num_classes, pretrained=cfg.pretrained,
                                            pretrained_path=cfg.pretrained_path, cache_dir=cache.folder)
    if cfg.grad_checkpoint:
        enable_grad_checkpointing(model, cfg.backbone)
    if cfg.layer_decay > 0:
        param_groups(model, cfg)  # a backbone without layer groups fails here, before any run opens
    if report is None:
        return {"init": "random"}
    log.info("pretrained weights: %s", report.summary())
    described = {"init": report.source, "init_tensors_loaded": f"{report.loaded}/{report.total} {report.matched_by}",
                 "init_reinitialised": ",".join(report.reinitialised) or "none"}
    if report.bn_eps is not None:
        described["init_bn_eps"] = report.bn_eps
    return described
