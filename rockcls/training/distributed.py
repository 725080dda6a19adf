"""One fold across processes and machines: `torch.distributed` as started by ``torchrun``.

``torchrun --nproc-per-node N -m rockcls train ...`` starts N copies of the command with RANK,
WORLD_SIZE and LOCAL_RANK set; `session` joins them into one process group (NCCL on GPUs, gloo on
the CPU) and hands the rest of the code a `Dist`. Every rank runs the same fold loop; what has side
effects outside the process (MLflow, checkpoints, the console summary) happens on rank 0, and what
rank 0 decided (run ids, a resumed checkpoint) reaches the others through `from_main`.

Every collective is bounded by the process group's timeout (ROCKCLS_DIST_TIMEOUT seconds, default
600), and a failed one (a rank died) becomes one `RankLost` line instead of a backend traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as tdist

from rockcls.core.errors import ConfigError, RockclsError, first_line
from rockcls.core.processes import sigterm_raises

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600


class RankLost(RockclsError):
    """A collective failed or timed out: another rank died or stopped answering."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank ``rank`` of ``world`` (one process: 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def place(self, device: torch.device) -> torch.device:
        """The rank's own device: GPU number LOCAL_RANK of its machine, or the CPU."""
        return torch.device("cuda", self.local_rank) if self.active and device.type == "cuda" else device


SINGLE = Dist()


def launched() -> bool:
    """True when this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {raw!r} (set by torchrun)") from None


def timeout_s() -> float:
    raw = os.environ.get("ROCKCLS_DIST_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"ROCKCLS_DIST_TIMEOUT: expected seconds, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"ROCKCLS_DIST_TIMEOUT: must be > 0, got {raw!r}")
    return value


@contextlib.contextmanager
def session(device: str) -> Iterator[Dist]:
    """The process group of a torchrun job for the ``device`` option (auto/cuda: NCCL on GPU
    LOCAL_RANK; cpu: gloo), or `SINGLE` when not started by torchrun."""
    if not launched():
        yield SINGLE
        return
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if gpu:
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} requested but CUDA is not available on this machine")
        torch.cuda.set_device(local)
    backend = "nccl" if gpu else "gloo"
    with sigterm_raises():
        try:
            tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
        except (RuntimeError, ValueError) as exc:
            raise RankLost(f"distributed: rank {rank} could not join the process group ({first_line(exc, 300)})") from None
        if rank != 0:  # one stream of progress lines: rank 0's (the others still report problems)
            logging.getLogger("rockcls").setLevel(logging.WARNING)
        try:
            yield Dist(rank=rank, world=world, local_rank=local, backend=backend)
        finally:
            with contextlib.suppress(Exception):
                tdist.destroy_process_group()




@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, tdist.DistError) as exc:
        raise RankLost(f"distributed: {what} failed: a rank died or stopped answering ({first_line(exc, 300)})") from None


def from_main(d: Dist, make: Callable[[], T]) -> T:
    """``make()`` evaluated on rank 0 only, its value handed to every rank (any picklable object)."""
    if not d.active:
        return make()
    box = [make() if d.main else None]
    with _collective("broadcast"):
        tdist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.active:
        with _collective("barrier"):
            tdist.barrier()


def all_sum(d: Dist, value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over the ranks (a copy)."""
    if not d.active:
        return value
    out = value.clone()
    with _collective("all_reduce"):
        tdist.all_reduce(out)
    return out


def gather_micro_major(d: Dist, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One optimizer step's per-sample values from every rank, in the order one process would
    hold them: micro-batch by micro-batch, and within one the ranks' shards in rank order (the
    sampler's order). ``parts`` holds one equal-length tensor per micro-batch."""
    local = torch.stack(list(parts))  # micro-batches x per-rank batch
    if not d.active:
        return local.reshape(-1)
    dtype = local.dtype
    local = local.to(torch.uint8) if dtype == torch.bool else local  # not every backend sends bool
    shards = [torch.empty_like(local) for _ in range(d.world)]
    with _collective("all_gather"):
        tdist.all_gather(shards, local.contiguous())
    return torch.stack(shards, dim=1).reshape(-1).to(dtype)


def shard(rows: np.ndarray, d: Dist) -> np.ndarray:
    """This rank's share of ``rows`` for evaluation: every world-th row from its rank on."""
    return rows[d.rank::d.world] if d.active else rows


def gather_eval(d: Dist, ev: dict) -> dict:
    """The evaluation of every rank's `shard`, merged into the single-process result: positions
    refer to the unsharded rows again and come in their order; the loss is over all of them."""
    if not d.active:
        return ev
    mine = (ev["logits"], ev["labels"], ev["positions"] * d.world + d.rank, ev.get("view_logits", {}))
    parts: list[Any] = [None] * d.world
    with _collective("all_gather_object"):
        tdist.all_gather_object(parts, mine)
    positions = np.concatenate([p[2] for p in parts])
    order = np.argsort(positions, kind="stable")
    logits = np.concatenate([p[0] for p in parts])[order]
    labels = np.concatenate([p[1] for p in parts])[order]
    views = {name: np.concatenate([p[3][name] for p in parts])[order] for name in parts[0][3]}
    loss = (torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
            if len(labels) else float("nan"))
    return {"val_loss": loss, "logits": logits, "labels": labels, "positions": positions[order],
            "view_logits": views}


def wrap(model: torch.nn.Module, d: Dist, device: torch.device, *, sync_bn: bool) -> torch.nn.Module:
    """The model as the training step sees it: DistributedDataParallel (SyncBatchNorm if asked)
    under torchrun, the model itself otherwise."""
    if not d.active:
        return model
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DistributedDataParallel wrapper (the one to save, evaluate and average)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def no_sync(model: torch.nn.Module, boundary: bool):
    """Skip the gradient all-reduce on micro-batches that do not end an accumulation."""
    if boundary or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()
