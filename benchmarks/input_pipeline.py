"""Images/s to produce training batches: a seed-style pipeline against rockcls's (cold and warm cache).

Usage: python benchmarks/input_pipeline.py DATA [--img-size 224] [--batch-size 32] [--workers 2]
       [--epochs 2] [--repeats 3] [--device auto]

All pipelines run in this one process with the same images, batch size, worker count and an
equivalent augmentation set (centre crop of 60-100 % of the shorter side, resize, horizontal and
vertical flips, CLAHE p=0.3, Gaussian noise p=0.3 with std 10-25 grey levels):

- reference: the seed write-up's pipeline: ``cv2.imread`` of the full file for every sample,
  every augmentation per image in the worker (albumentations on numpy), ``Normalize`` and
  ``ToTensorV2``, so float tensors leave the workers;
- rockcls files (cache=false): full decode per sample; crop, resize and CLAHE in the workers on
  uint8; uint8 batches leave the workers (flips, noise and normalisation run on the device);
- rockcls cold cache: the same reading the decode-once cache, timed from an empty cache folder
  (one decode pass that validates and fills the cache, then the epochs);
- rockcls warm cache: the same with the cache already built (every later fold, run and trial);
- rockcls warm + device step: as warm, plus flips, noise and normalisation of every batch on
  ``--device`` in this process (on a GPU this is what training does; on a CPU-only machine it
  competes with the workers for the same cores).

Each pipeline is timed ``--repeats`` times (a fresh cache folder each time) and the median is
reported, because other processes on a shared machine move single runs by 2x. The CPU time per
image (workers + this process, from ``getrusage``) is reported too: it depends much less on that
load, and with idle cores images/s is about cores / CPU time per image.

Ends with ``reference_images_per_s``, ``cold_images_per_s``, ``warm_images_per_s`` lines.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rockcls.data.cache import resolve_cache_size  # noqa: E402
from rockcls.data.index import DatasetIndex, index_dataset
from rockcls.data.sources import ImageDataset, open_source, validate_images  # noqa: E402
from rockcls.training.engine import StepSettings, prepare_batch  # noqa: E402
from rockcls.training.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceAugment,
    RandomCenterCrop,
    build_device_augment,
    build_train_transform,
)

PRESET = "seed"
REFERENCE = "reference"
FILES, COLD, WARM = "rockcls files (cache=false)", "rockcls cold cache", "rockcls warm cache"


class SeedDataset(torch.utils.data.Dataset):
    """The seed's dataset: decode the full file with OpenCV for every sample, augment per image."""

    def __init__(self, paths: list[str], labels: np.ndarray, transform: A.Compose):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = cv2.cvtColor(cv2.imread(self.paths[i]), cv2.COLOR_BGR2RGB)
        return self.transform(image=img)["image"], int(self.labels[i])


def build_reference_transform(size: int) -> A.Compose:
    """The seed's augmentation list with the probabilities and noise of rockcls's ``seed`` preset."""
    spec = build_device_augment(PRESET)
    return A.Compose([
        RandomCenterCrop(scale=(0.6, 1.0)), A.Resize(size, size),
        A.HorizontalFlip(p=spec.hflip), A.VerticalFlip(p=spec.vflip), A.CLAHE(p=0.3),
        A.GaussNoise(std_range=spec.noise_std, p=spec.noise),
        A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2(),
    ])


def build_datasets(index: DatasetIndex, args: argparse.Namespace, cache_dir: Path) -> dict[str, Callable]:
    """Pipeline name -> function returning its dataset (building the cache for the cold one)."""
    size = resolve_cache_size(args.img_size, args.cache_size)
    threads = max(4, 2 * args.workers)

    def rockcls(source) -> ImageDataset:
        return ImageDataset(source, np.arange(len(index)), index.labels, build_train_transform(PRESET, args.img_size))

    def cached() -> ImageDataset:
        # Train's path with the cache on: validation fills the cache in its decode pass.
        valid = validate_images(index, skip_bad=True, cache_dir=cache_dir, workers=threads, cache_size=size)
        return rockcls(open_source(valid, cache_dir=cache_dir, cache_size=size, workers=threads))

    return {REFERENCE: lambda: SeedDataset(index.paths, index.labels, build_reference_transform(args.img_size)),
            FILES: lambda: rockcls(open_source(index)), COLD: cached, WARM: cached}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_pipeline(make_dataset: Callable, args: argparse.Namespace,
                  device: torch.device | None) -> tuple[float, float]:
    """(images/s, CPU ms per image) from asking for the dataset (maybe building the cache) to the last batch.

    Without ``device`` batches are counted as they leave the workers; with it, rockcls's flips,
    noise and normalisation run on that device in this process first. The CPU time covers the
    workers, this process and the transfers between them, so it hardly depends on what else
    runs on the machine, unlike images/s.
    """
    cpu, start, seen = cpu_seconds(), time.perf_counter(), 0
    dataset = make_dataset()
    # Workers persist across epochs, as in training; the first epoch pays for starting them.
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(0))
    settings = StepSettings(device=device or torch.device("cpu"), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for epoch in range(args.epochs):
        augment = DeviceAugment(build_device_augment(PRESET), seed=epoch)
        for batch in loader:
            x = batch[0] if device is None else prepare_batch(batch[0], settings, augment)
            seen += len(x)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del loader, batch  # stops and joins the workers, so their CPU time is counted
    gc.collect()
    return seen / seconds, 1000 * (cpu_seconds() - cpu) / seen


def run(args: argparse.Namespace, device: torch.device) -> dict[str, list[tuple[float, float]]]:
    index = index_dataset(args.data)
    results: dict[str, list[tuple[float, float]]] = {}
    with_device = f"rockcls warm + device step on {device.type}"
    for _ in range(args.repeats):
        # A fresh cache folder each time, so "cold" is really the first use at this size.
        with tempfile.TemporaryDirectory(prefix="rockcls-bench-cache-") as tmp:
            makers = build_datasets(index, args, Path(tmp))
            for name, make in makers.items():
                results.setdefault(name, []).append(time_pipeline(make, args, None))
            results.setdefault(with_device, []).append(time_pipeline(makers[WARM], args, device))
    return results


def print_report(results: dict[str, list[tuple[float, float]]], args: argparse.Namespace,
                 device: torch.device) -> None:
    rate = {name: statistics.median(r for r, _ in runs) for name, runs in results.items()}
    cost = {name: statistics.median(c for _, c in runs) for name, runs in results.items()}
    print(f"data {args.data}: batch {args.batch_size}, {args.workers} workers, {args.img_size} px, "
          f"{args.epochs} epoch(s) x {args.repeats} repeats (medians), device {device}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, cv2 {cv2.__version__}")
    print(f"{'pipeline':<36} {'images/s':>9} {'speedup':>8} {'CPU ms/img':>11} {'CPU saving':>11}   images/s of each repeat")
    for name, runs in results.items():
        each = " ".join(f"{r:.0f}" for r, _ in runs)
        print(f"{name:<36} {rate[name]:>9.1f} {rate[name] / rate[REFERENCE]:>7.2f}x {cost[name]:>11.3f} "
              f"{cost[REFERENCE] / cost[name]:>10.2f}x   {each}")
    print()
    print(f"reference_images_per_s {rate[REFERENCE]:.1f}")
    print(f"files_images_per_s {rate[FILES]:.1f}")
    print(f"cold_images_per_s {rate[COLD]:.1f}")
    print(f"warm_images_per_s {rate[WARM]:.1f}")
    print(f"warm_device_step_{device.type}_images_per_s {rate[f'rockcls warm + device step on {device.type}']:.1f}")
    print(f"warm_speedup {rate[WARM] / rate[REFERENCE]:.2f}")
    print(f"reference_cpu_ms_per_image {cost[REFERENCE]:.3f}")
    print(f"warm_cpu_ms_per_image {cost[WARM]:.3f}")
    print(f"warm_cpu_saving {cost[REFERENCE] / cost[WARM]:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="class-per-folder dataset or CSV (e.g. the Lithology train folder)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--cache-size", type=int, default=0, help="0 = 8/7 of img-size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (all pipelines)")
    # Worker start-up, the cache's fingerprint check and opening the memory map are paid once per
    # run; a training run spans many epochs, so 6 epochs keep them from dominating the warm timing.
    parser.add_argument("--epochs", type=int, default=6, help="epochs timed per pipeline and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timings per pipeline; the median is reported")
    parser.add_argument("--device", default="auto", help="device step: auto (cuda if present), cpu, cuda")
    args = parser.parse_args(argv)
    for name in ("img_size", "batch_size", "epochs", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    print_report(run(args, device), args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
