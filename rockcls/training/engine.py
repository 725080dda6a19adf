"""One epoch of training and one pass of evaluation. Returns averaged metrics; never logs or saves."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from rockcls.core.progress import track
from rockcls.training import distributed
from rockcls.training.distill import distillation_losses
from rockcls.training.distributed import SINGLE, Dist
from rockcls.training.memory import HardNegativeMemory
from rockcls.training.transforms import TTA_VIEWS, DeviceAugment, dihedral, normalize


@dataclass
class StepSettings:
    """How batches become optimizer steps; derived once from the config by the caller."""

    device: torch.device
    mean: tuple[float, ...]
    std: tuple[float, ...]
    accumulation_steps: int = 1
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    temperature: float = 1.0  # distillation (with a teacher): softening of both distributions
    distill_weight: float = 0.0  # share of the loss from the teacher


def autocast(s: StepSettings):
    if s.amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=s.device.type, dtype=s.amp_dtype)


def prepare_batch(x: torch.Tensor, s: StepSettings, augment: DeviceAugment | None = None) -> torch.Tensor:
    """uint8 batch from the loader -> normalised float on the device (augmented if asked)."""
    x = x.to(s.device, non_blocking=True)
    if augment is not None:
        x = augment(x)
    x = normalize(x, s.mean, s.std)
    return x.contiguous(memory_format=torch.channels_last) if s.channels_last else x


class NonFiniteLoss(RuntimeError):
    """Training diverged: the loss became NaN or infinite."""


def train_one_epoch(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    s: StepSettings, *, lr_at: Callable[[int], float], start_step: int,
                    augment: DeviceAugment | None = None, memory: HardNegativeMemory | None = None,
                    ema=None, scaler: torch.amp.GradScaler | None = None, desc: str = "train",
                    dist: Dist = SINGLE, teacher: torch.Tensor | None = None) -> dict:
    """Train for one pass over ``loader``; update the hard-negative memory after every step.

    With a ``teacher`` (its scores of every dataset position, on the device) each sample's loss
    mixes the hard label and the teacher's softened probabilities (`distillation_losses`).

    Under torchrun (``dist``) ``model`` is DistributedDataParallel and ``loader`` yields this
    rank's shard: gradients are all-reduced once per optimizer step (``no_sync`` in between), the
    memory is fed every rank's per-sample losses, and the returned metrics are over all ranks.
    """
    model.train()
    step, seen, micro = start_step, 0, 0
    loss_sum = torch.zeros((), device=s.device)
    # Per-sample results stay on the device until the optimizer step: one host sync per step.
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    start = time.perf_counter()
    total = len(loader) if hasattr(loader, "__len__") else 0
    for x, y, pos in track(loader, total=total, desc=desc):
        y = y.to(s.device, non_blocking=True)
        micro += 1
        with distributed.no_sync(model, boundary=micro % s.accumulation_steps == 0 or micro == total):
            with autocast(s):
                logits = model(prepare_batch(x, s, augment))
                losses = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=s.label_smoothing)
                if teacher is not None:
                    losses = distillation_losses(logits, losses, teacher[pos.to(teacher.device)],
                                                 temperature=s.temperature, weight=s.distill_weight)
            loss = losses.mean()
            (scaler.scale(loss) if scaler else loss).div(s.accumulation_steps).backward()
        pending.append((pos.to(s.device), losses.detach(), logits.argmax(1) != y))
        loss_sum += losses.detach().sum()
        seen += len(y)
        if micro % s.accumulation_steps == 0:
            step = _finish_step(model, optimizer, s, scaler, lr_at, step, memory, pending, dist)
            if ema is not None:
                ema.update(distributed.unwrap(model), step=step)
            pending = []
    if pending:  # a trailing partial accumulation still counts as a step
        step = _finish_step(model, optimizer, s, scaler, lr_at, step, memory, pending, dist)
        if ema is not None:
            ema.update(distributed.unwrap(model), step=step)
    seconds = time.perf_counter() - start
    totals = distributed.all_sum(dist, torch.stack([loss_sum.float(), torch.tensor(float(seen), device=s.device)]))
    images = int(totals[1].item())
    return {"train_loss": totals[0].item() / max(images, 1), "lr": lr_at(max(step - 1, 0)), "steps": step,
            "images": images, "train_images_per_s": images / max(seconds, 1e-9)}


def _finish_step(model, optimizer, s: StepSettings, scaler, lr_at: Callable[[int], float], step: int,
                 memory: HardNegativeMemory | None, pending: list, dist: Dist = SINGLE) -> int:
    """Check the step's losses, step the optimizer, feed the memory; returns the new step count.

    Under torchrun the per-sample values of every rank are gathered first, in one process's
    order, so every rank sees the same losses and keeps the same memory."""
    if dist.active:
        pos, losses_t, wrong_t = (distributed.gather_micro_major(dist, [p[i] for p in pending]) for i in range(3))
    else:
        pos, losses_t, wrong_t = (torch.cat([p[i] for p in pending]) for i in range(3))
    losses = losses_t.float().cpu().numpy()
    if not np.isfinite(losses).all():
        raise NonFiniteLoss(f"loss is {float(np.mean(losses))} at step {step}")
    _optimizer_step(model, optimizer, s, scaler, lr_at(step))
    if memory is not None:
        memory.update(pos.cpu().numpy(), losses, wrong_t.cpu().numpy())
    return step + 1


def _optimizer_step(model, optimizer, s: StepSettings, scaler, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # layer-wise decay scales each group's share
    if scaler is not None:
        scaler.unscale_(optimizer)
    if s.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: Iterable, s: StepSettings, desc: str = "val",
             views: tuple[int, ...] = (0,)) -> dict:
    """Logits for every sample of ``loader`` (in loader order) and the mean loss.

    With several test-time ``views`` (`rockcls.training.transforms.dihedral`) the logits are the log of the
    softmax averaged over the views, which is what prediction returns for the same views. ``view_logits``
    holds the same for every named view set inside ``views`` (none, flip, d4), from the same forward
    passes: what fewer views would have scored.
    """
    model.eval()
    subsets = {name: vs for name, vs in TTA_VIEWS.items() if set(vs) <= set(views)}
    logits, labels, positions = [], [], []
    by_set: dict[str, list[torch.Tensor]] = {name: [] for name in subsets}
    total = len(loader) if hasattr(loader, "__len__") else 0
    for x, y, pos in track(loader, total=total, desc=desc):
        xn = prepare_batch(x, s)
        probs = {}
        for v in views:
            with autocast(s):
                out = model(dihedral(xn, v)).float()
            probs[v] = out if views == (0,) else torch.softmax(out, dim=1)
        if views == (0,):
            logits.append(probs[0].cpu())
        else:
            logits.append(torch.log(sum(probs.values()) / len(views)).cpu())
            for name, vs in subsets.items():
                by_set[name].append(torch.log(sum(probs[v] for v in vs) / len(vs)).cpu())
        labels.append(y)
        positions.append(pos)
    if not labels:  # nothing to evaluate (a network fitted on every image)
        empty = np.zeros((0, 0), dtype=np.float32)
        return {"val_loss": math.nan, "logits": empty, "labels": np.zeros(0, dtype=np.int64),
                "positions": np.zeros(0, dtype=np.int64), "view_logits": {}}
    logits_t, labels_t = torch.cat(logits), torch.cat(labels)
    loss = F.cross_entropy(logits_t, labels_t).item() if len(labels_t) else math.nan
    return {"val_loss": loss, "logits": logits_t.numpy(), "labels": labels_t.numpy(),
            "positions": torch.cat(positions).numpy().astype(np.int64),
            "view_logits": {name: torch.cat(parts).numpy() for name, parts in by_set.items() if parts}}


def cosine_with_warmup(*, base_lr: float, total_steps: int, warmup_steps: int,
                       min_ratio: float = 0.01) -> Callable[[int], float]:
    """Learning rate at an optimizer step: linear warmup, then cosine decay to min_ratio*base_lr."""
    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    return lr_at
