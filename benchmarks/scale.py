"""Scale-out, measured in one run: one fold's training on 1 vs N ranks, and a train run's folds in sequence vs in parallel.

Usage: python benchmarks/scale.py [--device cpu|cuda] [--ranks 1,2] [--backbone test_efficientnet]
       [--img-size 64] [--batch-size 32] [--steps 30] [--warmup 5] [--fold-epochs 4] [--only ranks,folds]

- ranks: rockcls's own training step (`train_one_epoch` with the mixture sampler and the
  hard-negative memory) on in-memory synthetic images, in 1, 2, ... processes joined by
  torch.distributed (gloo on the CPU, NCCL on GPUs, one GPU per rank). The global batch is the
  same for every rank count (``--batch-size``, split across the ranks), so the runs do the same
  optimisation. Reports images/s over all ranks and, per optimizer step, the time spent drawing
  the batch (sampler) and gathering the per-sample losses for the memory (all-gather). On the CPU
  the ranks share the machine's cores (each gets cores / N threads).
- folds: ``python -m rockcls train`` of a small model on a synthetic dataset, 2 folds one after
  another vs ``--devices cpu,cpu`` (``--devices 0,1`` with ``--device cuda``); whole-command wall time.

Prints a table, then ``ranksN_images_per_s``, ``ranksN_sampler_ms_per_step``,
``ranksN_gather_ms_per_step`` per rank count and ``folds_sequential_s``, ``folds_parallel_s``,
``folds_speedup``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rockcls.data.synthetic import make_dataset  # noqa: E402
from rockcls.training import distributed  # noqa: E402
from rockcls.training.device import use_channels_last  # noqa: E402
from rockcls.training.distributed import Dist  # noqa: E402
from rockcls.training.engine import StepSettings, train_one_epoch  # noqa: E402
from rockcls.training.models import build_model  # noqa: E402
from rockcls.training.memory import HardNegativeMemory  # noqa: E402
from rockcls.training.sampling import MixtureBatchSampler  # noqa: E402

NUM_IMAGES = 2048
NUM_CLASSES = 4


class InMemory(torch.utils.data.Dataset):
    """Synthetic uint8 images held in memory, so the data pipeline costs nothing measurable."""

    def __init__(self, size: int):
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(NUM_IMAGES) % NUM_CLASSES
        self.x = torch.randint(0, 256, (NUM_IMAGES, 3, size, size), generator=g, dtype=torch.uint8)

    def __len__(self) -> int:
        return NUM_IMAGES

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i]), i


class Timed:
    """Wraps a function and adds up the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def rank_main(rank: int, world: int, args: argparse.Namespace, init: str, out: str) -> None:
    cores = os.cpu_count() or 1
    if args.device == "cpu":
        torch.set_num_threads(max(1, cores // world))
    dist = distributed.SINGLE
    if world > 1:
        backend = "nccl" if args.device == "cuda" else "gloo"
        if args.device == "cuda":
            torch.cuda.set_device(rank)
        torch.distributed.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=300))
        dist = Dist(rank=rank, world=world, local_rank=rank, backend=backend)
    try:
        result = time_ranks(dist, args)
        if dist.main:
            Path(out).write_text(json.dumps(result))
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def time_ranks(dist: Dist, args: argparse.Namespace) -> dict:
    device = torch.device("cuda", dist.local_rank) if args.device == "cuda" else torch.device("cpu")
    data = InMemory(args.img_size)
    torch.manual_seed(0)
    model = build_model(args.backbone, NUM_CLASSES, pretrained=False).to(device)
    if use_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    net = distributed.wrap(model, dist, device, sync_bn=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    memory = HardNegativeMemory(512, NUM_IMAGES, half_life=20.0)
    sampler = MixtureBatchSampler(data.y.numpy(), batch_size=args.batch_size // dist.world, hn_ratio=0.25,
                                  balanced_ratio=0.5, memory=memory, seed=0, steps_per_epoch=args.warmup,
                                  num_replicas=dist.world, rank=dist.rank)
    draw = Timed(sampler._draw_effective)
    sampler._draw_effective = draw
    gather = Timed(distributed.gather_micro_major)
    distributed.gather_micro_major = gather
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=0)
    amp = torch.bfloat16 if device.type == "cuda" else None
    settings = StepSettings(device=device, mean=(0.5,) * 3, std=(0.25,) * 3, amp_dtype=amp,
                            channels_last=use_channels_last(device))
    step = train_one_epoch(net, loader, optimizer, settings, lr_at=lambda s: 1e-3, start_step=0, memory=memory,
                           dist=dist)["steps"]
    draw.seconds = gather.seconds = 0.0
    sampler.steps_per_epoch = args.steps
    sampler.set_epoch(1)
    out = train_one_epoch(net, loader, optimizer, settings, lr_at=lambda s: 1e-3, start_step=step, memory=memory,
                          dist=dist)
    return {"images_per_s": out["train_images_per_s"], "sampler_ms": 1000 * draw.seconds / args.steps,
            "gather_ms": 1000 * gather.seconds / args.steps, "memory": len(memory)}


def measure_ranks(world: int, args: argparse.Namespace) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="rockcls-scale-") as tmp:
        out = str(Path(tmp) / "result.json")
        procs = [ctx.Process(target=rank_main, args=(r, world, args, f"file://{tmp}/init", out)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + args.timeout
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"scale: a rank of the {world}-rank run failed or timed out")
        return json.loads(Path(out).read_text())


def measure_folds(args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="rockcls-scale-folds-") as tmp:
        data = make_dataset(Path(tmp) / "train", [80] * 3, size=args.img_size, seed=0)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "ROCKCLS_CACHE_DIR": f"{tmp}/cache"}
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            env.pop(var, None)
        base = [sys.executable, "-m", "rockcls", "train", "--data", str(data), "--backbone", args.backbone,
                "--no-pretrained", "--img-size", str(args.img_size), "--folds", "2", "--epochs", str(args.fold_epochs),
                "--batch-size", "32", "--num-workers", "0", "--device", args.device, "--experiment", "scale"]
        devices = "0,1" if args.device == "cuda" else "cpu,cpu"
        subprocess.run(base + ["--epochs", "1", "--folds", "2"], env=env, cwd=tmp, check=True, capture_output=True)  # warm cache
        times = {}
        for name, extra in (("sequential", []), ("parallel", ["--devices", devices])):
            start = time.perf_counter()
            done = subprocess.run(base + extra, env=env, cwd=tmp, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"scale: train ({name}) failed: {done.stderr.strip().splitlines()[-1:]}")
            times[name] = time.perf_counter() - start
        return times


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--ranks", default="1,2", help="rank counts to time, e.g. 1,2,4,8")
    parser.add_argument("--backbone", default="test_efficientnet")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (split across the ranks)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--fold-epochs", type=int, default=4, help="epochs per fold of the folds comparison")
    parser.add_argument("--only", default="ranks,folds", help="ranks, folds or both")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a rank run is given up")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parts = {p.strip() for p in args.only.split(",")}
    ranks = {int(n): measure_ranks(int(n), args) for n in args.ranks.split(",")} if "ranks" in parts else {}
    folds = measure_folds(args) if "folds" in parts else {}
    if ranks:
        print(f"{args.backbone} {args.img_size} px, global batch {args.batch_size}, {args.steps} steps on {args.device}")
        print(f"{'ranks':>5} {'images/s':>9} {'sampler ms/step':>16} {'gather ms/step':>15}")
        for n, r in ranks.items():
            print(f"{n:>5} {r['images_per_s']:>9.1f} {r['sampler_ms']:>16.3f} {r['gather_ms']:>15.3f}")
    if folds:
        print(f"2 folds x {args.fold_epochs} epochs: sequential {folds['sequential']:.1f} s, "
              f"parallel {folds['parallel']:.1f} s")
    for n, r in ranks.items():
        print(f"ranks{n}_images_per_s {r['images_per_s']:.1f}")
        print(f"ranks{n}_sampler_ms_per_step {r['sampler_ms']:.3f}")
        print(f"ranks{n}_gather_ms_per_step {r['gather_ms']:.3f}")
    if folds:
        print(f"folds_sequential_s {folds['sequential']:.1f}")
        print(f"folds_parallel_s {folds['parallel']:.1f}")
        print(f"folds_speedup {folds['sequential'] / folds['parallel']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
