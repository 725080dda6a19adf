"""Train images/s on a GPU and the share of step time spent waiting for data, torch.compile off/on.

Usage: python benchmarks/gpu_train.py [--data DIR] [--backbone davit_base] [--img-size 224]
       [--batch-size 64] [--workers 8] [--steps 50] [--warmup 15] [--compile both|on|off]
       [--cache true|false] [--device cuda|cpu] [--amp bf16|off]

The training step is rockcls's: uint8 batches from the DataLoader workers (decode-once cache,
crop/resize/CLAHE on the CPU), flips, noise and normalisation on the GPU (``DeviceAugment``,
``prepare_batch``), channels_last, bf16 autocast, AdamW. Each step is timed from asking the
loader for a batch to the end of the optimizer step (``torch.cuda.synchronize``); the time
blocked in ``next(loader)`` is the data wait. The first ``--warmup`` steps (cuDNN autotuning,
compilation) are not counted. Without ``--data`` it writes a synthetic dataset of 320 px images.

Needs CUDA: without a GPU it prints one line and exits with status 2 (no measurement was made,
so a script or CI job must not mistake the run for a result; 2 is rockcls's status for "cannot
run with this input/environment", distinct from a crash). ``--device cpu`` runs the same code
on the CPU as a smoke test of the script (numbers meaningless).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rockcls.data.cache import resolve_cache_size  # noqa: E402
from rockcls.data.index import index_dataset  # noqa: E402
from rockcls.data.sources import ImageDataset, open_source, validate_images
from rockcls.data.synthetic import make_dataset  # noqa: E402
from rockcls.training.engine import StepSettings, autocast, prepare_batch  # noqa: E402
from rockcls.training.models import build_model, model_spec  # noqa: E402
from rockcls.training.transforms import (  # noqa: E402
    DeviceAugment,
    build_device_augment,
    build_train_transform,
)

PRESET = "seed"
PREFETCH = 4


def build_loader(args: argparse.Namespace, cache_dir: Path) -> tuple[torch.utils.data.DataLoader, int]:
    index = index_dataset(args.data)
    size = resolve_cache_size(args.img_size, 0)
    valid = validate_images(index, skip_bad=True, cache_dir=cache_dir, workers=max(4, args.workers),
                            cache_size=size if args.cache else 0)
    source = open_source(valid, cache_dir=cache_dir, cache_size=size if args.cache else 0,
                         workers=max(4, args.workers))
    dataset = ImageDataset(source, np.arange(len(valid)), valid.labels, build_train_transform(PRESET, args.img_size))
    total = (max(args.warmup, buffered(args)) + args.steps) * args.batch_size
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=total,
                                             generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, pin_memory=args.device == "cuda",
                                         persistent_workers=args.workers > 0,
                                         prefetch_factor=PREFETCH if args.workers > 0 else None)
    return loader, len(valid.classes)


def buffered(args: argparse.Namespace) -> int:
    """Batches the workers prepare ahead: ready before anything is timed."""
    return args.workers * PREFETCH + 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(args: argparse.Namespace, loader, num_classes: int, compiled: bool) -> dict[str, float]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.backbone, num_classes, pretrained=False).to(device)
    model = model.to(memory_format=torch.channels_last)
    spec = model_spec(model, args.backbone, [str(k) for k in range(num_classes)], args.img_size, PRESET)
    step_model = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    settings = StepSettings(device=device, mean=tuple(spec["mean"]), std=tuple(spec["std"]), label_smoothing=0.1,
                            amp_dtype=torch.bfloat16 if args.amp == "bf16" else None, channels_last=True)
    augment = DeviceAugment(build_device_augment(PRESET), seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    waited = elapsed = 0.0
    batches = iter(loader)
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        x, y, _ = next(batches)
        got = time.perf_counter()
        with autocast(settings):
            logits = step_model(prepare_batch(x, settings, augment))
        loss = F.cross_entropy(logits.float(), y.to(device, non_blocking=True), label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            waited += got - start
            elapsed += time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"images_per_s": args.steps * args.batch_size / elapsed, "data_wait_share": waited / elapsed,
            "step_ms": 1000 * elapsed / args.steps, "peak_gib": peak}


def time_loader(args: argparse.Namespace, loader) -> float:
    """Images/s the workers deliver alone (pinned uint8 batches), the ceiling for training.

    The batches prefetched while the workers start are drained first, so the rate is the
    steady state, not the emptying of a full buffer.
    """
    batches = iter(loader)
    for _ in range(buffered(args)):
        next(batches)
    start, n = time.perf_counter(), 0
    for _ in range(args.steps):
        x, _, _ = next(batches)
        n += len(x)
    return n / (time.perf_counter() - start)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="class-per-folder dataset; default: synthetic 320 px images")
    parser.add_argument("--backbone", default="davit_base")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8, help="DataLoader worker processes")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps first (autotuning, compilation)")
    parser.add_argument("--compile", choices=("both", "off", "on"), default="both")
    parser.add_argument("--cache", choices=("true", "false"), default="true", help="decode-once cache or files")
    parser.add_argument("--synthetic-images", type=int, default=2000)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: smoke test only")
    parser.add_argument("--amp", choices=("bf16", "off"), default="bf16", help="bf16 autocast, or float32 (TF32 matmuls)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_train: needs a CUDA GPU and torch.cuda.is_available() is False here; nothing measured",
              file=sys.stderr)
        return 2
    args.cache = args.cache == "true"
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.compile]
    with tempfile.TemporaryDirectory(prefix="rockcls-gpu-bench-") as tmp:
        if not args.data:
            per_class = max(2, args.synthetic_images // 5)
            args.data = str(make_dataset(Path(tmp) / "train", [per_class] * 5, size=320, seed=0, ext=".jpg"))
        loader, num_classes = build_loader(args, Path(tmp) / "cache")
        loader_rate = time_loader(args, loader)
        results = {c: time_training(args, loader, num_classes, c) for c in modes}
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke test)"
    print(f"{gpu}: {args.backbone} {args.img_size} px, batch {args.batch_size}, {args.workers} workers, "
          f"{'bf16 autocast' if args.amp == 'bf16' else 'float32'}, channels_last, cache {args.cache}, "
          f"torch {torch.__version__}")
    print(f"{'torch.compile':<14} {'images/s':>9} {'step ms':>8} {'data wait':>10} {'peak GiB':>9}")
    for compiled, r in results.items():
        print(f"{'on' if compiled else 'off':<14} {r['images_per_s']:>9.1f} {r['step_ms']:>8.1f} "
              f"{100 * r['data_wait_share']:>9.1f}% {r['peak_gib']:>9.1f}")
    print(f"{'loader alone':<14} {loader_rate:>9.1f}")
    print()
    print(f"gpu {gpu.replace(' ', '_')}")
    print(f"batch_size {args.batch_size}")
    print(f"loader_images_per_s {loader_rate:.1f}")
    for compiled, r in results.items():
        tag = "on" if compiled else "off"
        print(f"images_per_s_compile_{tag} {r['images_per_s']:.1f}")
        print(f"data_wait_share_compile_{tag} {r['data_wait_share']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
