"""Training and inference throughput by memory format and allocator setting, compared in one run.

Usage: python benchmarks/cpu_speed.py [--device cpu] [--models resnet10t:96,efficientnet_lite0:192]
       [--batch-size 32] [--steps 10] [--repeats 2]

Four variants per ``backbone:size``: NCHW or channels_last (NHWC) tensors, each with glibc's
default allocator behaviour or with rockcls's `keep_freed_memory` (mmap and trim thresholds
raised). rockcls uses NHWC + the tuned allocator (``rockcls.training.device``); the other three
are the references. Each variant runs in a fresh process (the allocator setting is per process):
random weights, two warm-up AdamW steps, ``--steps`` timed training steps on one random batch,
then ``--steps`` timed forward passes in eval mode. The variants alternate and each keeps the best
of ``--repeats`` rounds, so a busy machine hurts them alike.

Prints a table and ``<backbone>_<size>_<train|eval>_<nchw|nhwc>_<default|tuned> N`` lines
(images per second) and ``<backbone>_<size>_train_speedup N`` (rockcls's variant over NCHW with
the default allocator).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = (("nchw", "default"), ("nchw", "tuned"), ("nhwc", "default"), ("nhwc", "tuned"))


def measure(backbone: str, size: int, layout: str, allocator: str, args: argparse.Namespace) -> dict:
    """One variant in this process: images per second in training and in eval."""
    import torch

    from rockcls.training.device import keep_freed_memory
    from rockcls.training.models import build_model

    tuned = keep_freed_memory() if allocator == "tuned" else False
    device = torch.device(args.device)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(backbone, 3, pretrained=False).to(device).to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch_size, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 3, (args.batch_size,), device=device)
    model.train()
    for step in range(2 + args.steps):
        if step == 2:
            start = synced(device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    train = args.steps * args.batch_size / (synced(device) - start)
    model.eval()
    with torch.inference_mode():
        model(x)
        start = synced(device)
        for _ in range(args.steps):
            model(x)
        evaluate = args.steps * args.batch_size / (synced(device) - start)
    return {"train": train, "eval": evaluate, "tuned": tuned}


def synced(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def in_child(backbone: str, size: int, layout: str, allocator: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "ROCKCLS_MALLOC_TUNING": "1" if allocator == "tuned" else "0"}
    cmd = [sys.executable, __file__, "--child", f"{backbone}:{size}:{layout}:{allocator}", "--device", args.device,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{backbone} {size} px {layout}/{allocator} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="resnet10t:96,efficientnet_lite0:192")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.child:
        backbone, size, layout, allocator = args.child.split(":")
        print(json.dumps(measure(backbone, int(size), layout, allocator, args)))
        return 0
    lines = []
    header = " ".join(f"{layout.upper()}/{alloc:<7}" for layout, alloc in VARIANTS)
    print(f"{'model, phase (images/s)':<34} {header}")
    for item in args.models.split(","):
        backbone, _, size_text = item.partition(":")
        size = int(size_text or 224)
        best: dict[tuple[str, str], dict] = {}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                got = in_child(backbone, size, *variant, args)
                if variant[1] == "tuned" and not got["tuned"]:
                    print("note: the allocator setting had no effect here (no glibc, or a preloaded allocator)")
                old = best.get(variant, {"train": 0.0, "eval": 0.0})
                best[variant] = {k: max(old[k], got[k]) for k in ("train", "eval")}
        for phase in ("train", "eval"):
            cells = " ".join(f"{best[v][phase]:>12.1f}" for v in VARIANTS)
            print(f"{backbone + ' ' + str(size) + ' px, ' + phase:<34} {cells}", flush=True)
            lines += [f"{backbone}_{size}_{phase}_{layout}_{alloc} {best[(layout, alloc)][phase]:.1f}"
                      for layout, alloc in VARIANTS]
        speedup = best[("nhwc", "tuned")]["train"] / best[("nchw", "default")]["train"]
        lines.append(f"{backbone}_{size}_train_speedup {speedup:.2f}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
