"""One fold of a train run: its loaders, model, optimizer, sampler and hard-negative memory, its
epochs, and its end (the kept weights evaluated with the OOF test-time views). Each fold writes
``last.pt`` (everything needed to continue) after every epoch, atomically, so a killed run
continues from the last completed epoch; what a fold logs is written by `rockcls.training.record`."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm.utils
import torch

from rockcls.core import gallery, names
from rockcls.core.config import TrainConfig
from rockcls.core.errors import RockclsError, first_line
from rockcls.core.metrics import macro_f1, per_class_f1, safe_name
from rockcls.data.sources import ImageDataset
from rockcls.training import distributed, record
from rockcls.training.checkpoint import load_checkpoint, load_weights, save_checkpoint, write_npz_atomic
from rockcls.training.device import keep_freed_memory, use_channels_last
from rockcls.training.distributed import from_main
from rockcls.training.engine import StepSettings, cosine_with_warmup, evaluate, train_one_epoch
from rockcls.training.fold_runs import VIEW_PREFIX, find_fold_run, finished_fold_result, fold_label
from rockcls.training.memory import HardNegativeMemory
from rockcls.training.models import build_model, enable_grad_checkpointing, model_spec, param_groups
from rockcls.training.plan import Plan
from rockcls.training.sampling import MixtureBatchSampler
from rockcls.training.transforms import (
    DeviceAugment,
    build_device_augment,
    build_eval_transform,
    build_train_transform,
    tta_views,
)

log = logging.getLogger("rockcls")

EpochHook = Callable[[int, int, dict[str, float]], None]
LAST_CHECKPOINT = "last.pt"  # a fold's local state after each epoch (what resume reads); never logged


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
        return from_main(dist, lambda: finished_fold_result(fold_run, fold, kind))
    resumed = fold_run is not None
    fold_run = from_main(dist, lambda: record.open_fold_run(plan, parent_id, fold, fold_run, kind))
    with record.closing_on_main(dist, fold_run), record.system_metrics_on_main(dist, fold_run, plan.cfg, label=label,
                                                                 resume=resumed):
        return FoldTrainer(plan, parent_id, fold, fold_run).fit(on_epoch_end)


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
                            cache_dir=plan.cache.folder).to(plan.device)
        if self.cfg.grad_checkpoint:
            enable_grad_checkpointing(model, self.cfg.backbone)
        if use_channels_last(plan.device):
            model = model.to(memory_format=torch.channels_last)
        self.net = distributed.wrap(model, self.dist, plan.device, sync_bn=self.cfg.sync_bn)
        self.model = distributed.unwrap(self.net)
        self.spec = model_spec(self.model, self.cfg.backbone, plan.index.classes, self.cfg.img_size, self.cfg.augment)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.ema = timm.utils.ModelEmaV3(self.model, decay=self.cfg.ema) if self.cfg.ema > 0 else None
        self.scaler = torch.amp.GradScaler("cuda") if plan.amp_dtype == torch.float16 else None
        self.memory = self._build_memory()
        batches = plan.batches
        self.sampler = MixtureBatchSampler(plan.index.labels[self.train_rows], batch_size=batches.batch_size,
                                           accumulation_steps=batches.accumulation_steps,
                                           hn_ratio=batches.hn_ratio if self.memory else 0.0,
                                           balanced_ratio=batches.balanced_ratio, memory=self.memory,
                                           seed=self.cfg.seed * 100 + fold, num_replicas=batches.num_replicas,
                                           rank=self.dist.rank)
        steps = len(self.sampler) // self.cfg.accumulation_steps
        self.lr_at = cosine_with_warmup(base_lr=self.cfg.lr, total_steps=steps * self.cfg.epochs,
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
        steps = self.plan.batches.steps_per_epoch(len(self.train_rows))
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
        last = self.dir / LAST_CHECKPOINT
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
            what = f"no {exc} entry" if isinstance(exc, KeyError) else first_line(exc, 160)
            raise RockclsError(f"checkpoint {last} cannot be resumed from ({what}); move it aside to "
                               f"train fold {self.fold} again from its first epoch") from None
        if self.dist.main:
            record.log_missing_epoch(self.run_id, self.state.epoch - 1, ck["metrics"])
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
        save_checkpoint(self.checkpoint(metrics), self.dir / LAST_CHECKPOINT)
        self._drop_stale_best()
        record.log_epoch(self.plan, self.run_id, epoch, metrics, self._epoch_galleries(epoch, ev))
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

    def _epoch_galleries(self, epoch: int, ev: dict | None) -> dict[str, list]:
        """Every ``gallery_every`` epochs the epoch's highest-loss validation images; then and at the
        fold's last epoch the memory's highest-loss members (gallery key -> its examples)."""
        size, every = self.cfg.gallery_size, self.cfg.gallery_every
        due = size > 0 and every > 0 and (epoch + 1) % every == 0
        last = self.state.epoch >= self.cfg.epochs or self._early_stopped()
        index, out = self.plan.index, {}
        if due and ev is not None:
            rows = self.val_rows[ev["positions"]]
            out[names.HARDEST_VAL] = gallery.hardest(rows, ev["logits"], ev["labels"], paths=index.paths,
                                                     classes=index.classes, n=size)
        if self.memory is not None and size > 0 and (due or last):
            rows = self.train_rows[self.memory.ids()]
            out[names.HN_MEMORY] = gallery.highest(rows, self.memory.losses(), index.labels[rows], paths=index.paths,
                                                   classes=index.classes, n=size)
        return out

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
        model = self._save_kept(kept, kept_epoch, oof_macro_f1=score)
        oof = self.dir / names.OOF_FOLD
        write_npz_atomic(oof, rows=rows, logits=ev["logits"], score=np.float64(score),
                         **{f"{VIEW_PREFIX}{name}": v for name, v in views.items()})
        examples = None
        if self.cfg.gallery_size > 0:
            index = self.plan.index
            examples = gallery.hardest(rows, ev["logits"], ev["labels"], paths=index.paths, classes=index.classes,
                                       n=self.cfg.gallery_size)
        record.log_fold_result(self.plan, self.run_id, self.parent_id, self.fold, model=model, oof=oof,
                               examples=examples, kept_epoch=kept_epoch, train_images=len(self.train_rows),
                               val_images=len(self.val_rows),
                               metrics={"oof_macro_f1": score, "best_val_macro_f1": self.state.best_f1,
                                        "best_epoch": float(self.state.best_epoch), "kept_epoch": float(kept_epoch)})
        shutil.rmtree(self.dir, ignore_errors=True)
        return result

    def _save_kept(self, kept: torch.nn.Module, epoch: int, **extra: Any) -> Path:
        """The kept weights with what prediction needs to rebuild them (spec, classes, tta)."""
        path = self.dir / record.FOLD_MODEL_NAME
        save_checkpoint({"model": kept.state_dict(), "spec": {**self.spec, "tta": self.cfg.tta},
                         "classes": self.spec["classes"], "epoch": epoch, "fold": self.fold, **extra}, path)
        return path

    def _finish_full(self) -> dict:
        """The network on every image keeps its last epoch (nothing was held out to pick another)."""
        if not self.dist.main:
            return {}
        model = self._save_kept(self.ema.module if self.ema else self.model, self.state.epoch - 1)
        record.log_full_result(self.plan, self.run_id, self.parent_id, model=model, images=len(self.train_rows),
                               epochs_run=self.state.epoch)
        shutil.rmtree(self.dir, ignore_errors=True)
        return {}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` at ``cfg.lr`` (resolved by the plan: never 0 here); no weight decay on
    biases and normalisation weights; with ``layer_decay`` timm's groups, each with its ``lr_scale``."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)


def seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own, reproducible augmentation stream."""
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    np.random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
