"""What `evaluate` costs over `predict` on the same images, whole processes timed in one run.

Usage: python benchmarks/evaluate_cost.py DATA MODEL [--images 440] [--work DIR]

DATA is a class-per-folder tree; ``--images`` of its files, spread evenly over it, go into one
labelled CSV. MODEL is anything `predict` and `evaluate` take (a train run id, an ensemble run
id, models:/NAME@alias) in the store of MLFLOW_TRACKING_URI. Runs `python -m rockcls predict`,
then `python -m rockcls evaluate` (its defaults: gallery of 16, MLflow's classifier evaluation),
then `evaluate --mlflow-evaluate false`, each on the CSV with the model's own TTA, and prints
``predict_s``, ``evaluate_s``, ``evaluate_without_mlflow_evaluate_s`` and ``evaluate_overhead_s``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("model")
    parser.add_argument("--images", type=int, default=440)
    parser.add_argument("--work", default="")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="rockcls-evaluate-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in Path(args.data).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if len(files) < args.images:
        parser.error(f"{args.data} has {len(files)} images, fewer than --images {args.images}")
    step = len(files) / args.images
    picked = [files[int(i * step)] for i in range(args.images)]
    csv = work / "labelled.csv"
    csv.write_text("img_path,label\n" + "".join(f"{p.resolve()},{p.parent.name}\n" for p in picked))
    common = ["--model", args.model, "--data", str(csv), "--num-workers", "0", "--experiment", "evaluate-cost"]
    times = {}
    for name, cmd in (("predict_s", ["predict", "--out", str(work / "sub.csv")]),
                      ("evaluate_s", ["evaluate"]),
                      ("evaluate_without_mlflow_evaluate_s", ["evaluate", "--mlflow-evaluate", "false"])):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "rockcls", *cmd, *common], cwd=work, env=os.environ,
                              capture_output=True, text=True)
        times[name] = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"{cmd[0]} failed:\n{done.stderr[-2000:]}")
        print(done.stdout.strip().splitlines()[-1])
    print(f"images {args.images}")
    for name, seconds in times.items():
        print(f"{name} {seconds:.1f}")
    print(f"evaluate_overhead_s {times['evaluate_s'] - times['predict_s']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
