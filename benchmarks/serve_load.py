"""Load test of a served rockcls ensemble: good and hostile requests from concurrent clients.

    PYTHONPATH=. python benchmarks/serve_load.py [--requests 60] [--clients 4] [--rows 4]
        [--attack-clients 8] [--attack-side 10000] [--backbone test_vit --img-size 32]

Trains a tiny ensemble (timm ``test_vit``, 32 px, 1 epoch, 2 folds) on synthetic images into a
temporary MLflow store, registers it, starts ``mlflow models serve --env-manager local`` on
127.0.0.1 with ``ROCKCLS_IMAGE_ROOT`` set to the image folder, and sends ``--requests`` requests
from ``--clients`` threads. Requests cycle through: image paths under the root, base64, base64
with line breaks (as ``base64`` without ``-w0`` prints it), a batch mixing one good image with
every bad input (a PNG header claiming 40000x40000, a truncated PNG, an EPS file, an img_path
outside the root, a FIFO under the root), and ``batch_size=-1``. Every answer is checked: bad
rows carry their reason, good rows of the same batch are predicted, no body holds a traceback.

Prints ``requests``, ``errors_5xx``, ``p50_ms``, ``p99_ms``, ``images_per_s`` (good images
predicted per second of the load phase), ``server_peak_rss_mb`` (all server processes, sampled
every 50 ms), the check results, and one line per bad input with the answer it got.

Then the attack phase: the good one-image requests again, one client, first alone
(``good_p99_ms_alone``), then while ``--attack-clients`` clients keep sending legal
``--attack-side``-square PNGs (a few hundred KB each, 100 Mpx decoded at the default side) and
1-bit PNGs of that size: ``good_p99_ms_under_attack``, ``attack_server_peak_rss_mb`` (goal: bounded
by the decode budget, ROCKCLS_DECODE_PIXELS, not by the number of attackers) and the attackers'
answers. Last, single hostile bodies: 50 MB of spaced base64 text, 20,000 rows of invalid base64,
and their answer, time and the server's peak memory. ``--backbone`` / ``--img-size`` give the
served model a real size (random weights; e.g. efficientnet_lite0 at 224).
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
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NAME = "serve-load"


def build_model(work: Path, backbone: str = "test_vit", img_size: int = 32) -> tuple[str, Path]:
    """Train and register the tiny ensemble; returns (tracking URI, image folder)."""
    import mlflow

    from rockcls.core import tracking
    from rockcls.core.config import TrainConfig, build_config
    from rockcls.data.synthetic import make_dataset
    from rockcls.runs import ensemble, registry
    from rockcls.training.trainer import run_training

    uri = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["ROCKCLS_CACHE_DIR"] = str(work / "cache")
    mlflow.set_tracking_uri(uri)
    data = make_dataset(work / "images", [16, 16, 16], size=48, seed=3)
    cfg = build_config(TrainConfig, dict(data=str(data), backbone=backbone, pretrained=False, img_size=img_size,
                                         folds=2, epochs=1, batch_size=16, num_workers=0, hn_memory=32,
                                         warmup_epochs=0.5, device="cpu", output_dir=str(work / "outputs")))
    run = run_training(cfg)
    fit = ensemble.fit_ensemble(ensemble.load_members([run.run_id]))
    run_id = ensemble.log_ensemble(fit, experiment="rockcls")
    registry.register_ensemble(fit, name=NAME, run_id=run_id)
    tracking.end_run(run_id)
    return uri, data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path, uri: str, root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "ROCKCLS_IMAGE_ROOT": str(root),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(work / "serve.log", "w")
    return subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                             f"models:/{NAME}@champion", "--env-manager", "local", "-h", "127.0.0.1",
                             "-p", str(port), "-w", "1"],
                            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 180) -> None:
    from rockcls.core.processes import wait_for_http

    why = wait_for_http(proc, f"{url}/ping", timeout=timeout_s)
    if why:
        raise SystemExit(f"server {why} (/ping):\n{log.read_text()[-3000:]}")


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the server's process group (uvicorn workers included)."""
    total_kb = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # fields[2] is the pgrp (field 5 of /proc/PID/stat)
                continue
            for line in Path(entry.path, "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while being read
    return total_kb / 1024


class RssSampler(threading.Thread):
    def __init__(self, pgid: int, every_s: float = 0.05):
        super().__init__(daemon=True)
        self.pgid, self.every_s, self.peak, self.stop = pgid, every_s, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, group_rss_mb(self.pgid))
            self.stop.wait(self.every_s)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def build_requests(images: list[Path], root: Path, outside: Path, fifo: Path, n: int, rows: int) -> list[dict]:
    """``n`` request specs: the payload and, per row, what a correct answer looks like."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' hostile files
    from tests.hostile import EPS_BYTES, png_header_only
    from rockcls.inference.serving import PATH_REFUSED

    good = [p.read_bytes() for p in images]
    bad = [("40000x40000 PNG header (b64)", [None, b64(png_header_only(40000, 40000))], "too large"),
           ("truncated PNG (b64)", [None, b64(good[0][: len(good[0]) // 2])], "not a decodable image"),
           ("EPS file (b64)", [None, b64(EPS_BYTES)], "not a decodable image"),
           ("img_path outside the root", [str(outside), None], PATH_REFUSED),
           ("img_path ../ escaping the root", ["../outside.png", None], PATH_REFUSED),
           ("FIFO under the root", [str(fifo.relative_to(root)), None], PATH_REFUSED),
           ("not base64", [None, "%%%"], "image_b64: not valid base64")]
    specs = []
    for i in range(n):
        kind = ("path", "b64", "b64_wrapped", "mixed_bad", "bad_param")[i % 5]
        pick = [(i * rows + k) % len(images) for k in range(rows)]
        if kind == "path":
            data = [[str(images[k].relative_to(root)), None] for k in pick]
        elif kind == "b64":
            data = [[None, b64(good[k])] for k in pick]
        elif kind == "b64_wrapped":
            data = [[None, base64.encodebytes(good[k]).decode("ascii")] for k in pick]
        elif kind == "mixed_bad":
            data = [[None, b64(good[pick[0]])]] + [row for _, row, _ in bad]
        else:
            data = [[None, b64(good[pick[0]])]]
        expect = [""] * len(data) if kind != "mixed_bad" else [""] + [reason for _, _, reason in bad]
        body = {"dataframe_split": {"columns": ["img_path", "image_b64"], "data": data}}
        if kind == "bad_param":
            body["params"] = {"batch_size": -1}
        specs.append({"kind": kind, "body": json.dumps(body).encode(), "expect": expect,
                      "labels": [name for name, _, _ in bad] if kind == "mixed_bad" else []})
    return specs


def post(url: str, payload: bytes) -> tuple[int, str, float]:
    req = urllib.request.Request(f"{url}/invocations", data=payload, method="POST",
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    return status, text, (time.perf_counter() - start) * 1000


def check(spec: dict, status: int, text: str) -> tuple[list[str], int, dict[str, str]]:
    """(problems, good images predicted, answer per bad input) of one response."""
    problems, answers = [], {}
    if "Traceback" in text or "stack_trace" in text:
        problems.append(f"{spec['kind']}: traceback in the response")
    if spec["kind"] == "bad_param":
        if status != 400 or "batch_size: must be >= 1" not in text:
            problems.append(f"bad_param: HTTP {status}: {text[:200]}")
        # MLflow puts the request's data in front of the model's message: keep the model's part.
        message = json.loads(text).get("message", "").rsplit("Error: ", 1)[-1]
        answers["batch_size=-1"] = f"HTTP {status}, message {message!r}"
        return problems, 0, answers
    if status != 200:
        return problems + [f"{spec['kind']}: HTTP {status}: {text[:200]}"], 0, answers
    rows = json.loads(text)["predictions"]
    good = 0
    for k, (row, want) in enumerate(zip(rows, spec["expect"])):
        if not want:
            if row["error"] or not row["label"]:
                problems.append(f"{spec['kind']} row {k}: good image not predicted ({row['error']})")
            good += 1
        else:
            if row["label"] or not row["error"].startswith(want):
                problems.append(f"{spec['kind']} row {k}: expected {want!r}, got {row['error']!r}")
            answers[spec["labels"][k - 1]] = f"HTTP 200, row error {row['error']!r}"
    return problems, good, answers


def big_pngs(side: int) -> list[tuple[str, bytes]]:
    """Legal but expensive images: an 8-bit RGB and a 1-bit PNG of ``side`` x ``side`` pixels."""
    import cv2
    import numpy as np
    from PIL import Image

    rgb = cv2.imencode(".png", np.zeros((side, side, 3), dtype=np.uint8))[1].tobytes()
    one_bit = __import__("io").BytesIO()
    Image.new("1", (side, side)).save(one_bit, format="PNG")
    return [(f"{side}x{side} RGB PNG ({len(rgb) // 1024} KB)", rgb),
            (f"{side}x{side} 1-bit PNG ({len(one_bit.getvalue()) // 1024} KB)", one_bit.getvalue())]


def body_of(rows: list[str]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image_b64"], "data": [[r] for r in rows]}}).encode()


def p99_of(ms: list[float]) -> float:
    ms = sorted(ms)
    return ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]


def attack_phase(url: str, good: list[bytes], bombs: list[tuple[str, bytes]], clients: int, pgid: int) -> dict:
    """Good one-image requests from one client, alone and then while ``clients`` attackers send
    ``bombs`` in a loop: good latencies, server peak memory, the attackers' answers."""
    alone = [post(url, body)[2] for body in good]
    stop, answers, sampler = threading.Event(), {}, RssSampler(pgid)
    lock = threading.Lock()

    def attacker(k: int) -> None:
        name, data = bombs[k % len(bombs)]
        body = body_of([b64(data)])
        while not stop.is_set():
            status, text, ms = post(url, body)
            key = f"{name}: HTTP {status}" + ("" if status == 200 else f" {text[:90]!r}")
            if status == 200:
                err = json.loads(text)["predictions"][0]["error"]
                key += f", row error {err[:90]!r}" if err else ", predicted"
            with lock:
                answers.setdefault(key, []).append(ms)

    sampler.start()
    threads = [threading.Thread(target=attacker, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3)  # let the attack reach its peak first
    during = [post(url, body)[2] for body in good]
    stop.set()
    for t in threads:
        t.join(timeout=300)
    sampler.stop.set()
    sampler.join()
    return {"alone": alone, "during": during, "peak": sampler.peak, "answers": answers}


def hostile_bodies(url: str, pgid: int) -> list[str]:
    """One request each: a spaced 50 MB base64 text, 20,000 rows of invalid base64."""
    lines = []
    for name, body in (("50 MB of 'AB AB ...' base64 text", body_of(["AB " * (50 * 2**20 // 3)])),
                       ("20,000 rows of invalid base64", body_of(["%%%"] * 20000))):
        sampler = RssSampler(pgid)
        base = group_rss_mb(pgid)
        sampler.start()
        status, text, ms = post(url, body)
        sampler.stop.set()
        sampler.join()
        try:
            msg = json.loads(text)
            msg = msg.get("message", "").rsplit("Error: ", 1)[-1] if "message" in msg else msg["predictions"][0]["error"]
        except (ValueError, KeyError, IndexError):
            msg = text[:120]
        lines.append(f"hostile: {name} -> HTTP {status} {msg[:110]!r} in {ms:.0f} ms, "
                     f"server +{max(0.0, sampler.peak - base):.0f} MB")
    return lines


def main(argv: list[str] | None = None) -> int:
    from rockcls.core.processes import stop_process_group

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60, help="requests in all")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--rows", type=int, default=4, help="images per good request")
    parser.add_argument("--attack-clients", type=int, default=8, help="clients sending huge legal PNGs (0: no attack)")
    parser.add_argument("--attack-side", type=int, default=10000, help="side of the attack PNGs, pixels")
    parser.add_argument("--backbone", default="test_vit", help="the served model's backbone (random weights)")
    parser.add_argument("--img-size", type=int, default=32)
    args = parser.parse_args(argv)
    if min(args.requests, args.clients, args.rows) < 1:
        parser.error("--requests, --clients and --rows must be >= 1")
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="rockcls-serve-load-") as tmp:
        work = Path(tmp)
        os.chdir(work)  # MLflow's default artifact folder (./mlruns) lands in the temporary folder
        t0 = time.perf_counter()
        uri, root = build_model(work, args.backbone, args.img_size)
        print(f"model trained and registered in {time.perf_counter() - t0:.0f} s")
        outside = work / "outside.png"
        images = sorted(root.rglob("*.png"))
        outside.write_bytes(images[0].read_bytes())
        fifo = root / "fifo.png"
        os.mkfifo(fifo)
        specs = build_requests(images, root, outside, fifo, args.requests, args.rows)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(work, uri, root, port)
        try:
            wait_ready(proc, url, work / "serve.log")
            idle_mb = group_rss_mb(proc.pid)
            sampler = RssSampler(proc.pid)
            sampler.start()
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                results = list(pool.map(lambda s: post(url, s["body"]), specs))
            wall = time.perf_counter() - start
            sampler.stop.set()
            sampler.join()
            attack = None
            if args.attack_clients:
                good = [body_of([b64(p.read_bytes())]) for p in images[:40]]
                attack = attack_phase(url, good, big_pngs(args.attack_side), args.attack_clients, proc.pid)
            hostile = hostile_bodies(url, proc.pid)
        finally:
            stop_process_group(proc)
            os.chdir(here)
    problems, good, answers = [], 0, {}
    for spec, (status, text, _) in zip(specs, results):
        p, g, a = check(spec, status, text)
        problems += p
        good += g
        answers.update(a)
    latencies = sorted(ms for _, _, ms in results)
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
    print(f"requests {len(results)}")
    print(f"clients {args.clients}")
    print(f"errors_5xx {sum(status >= 500 for status, _, _ in results)}")
    print(f"errors_4xx {sum(400 <= status < 500 for status, _, _ in results)} (expected: the batch_size=-1 requests, "
          f"{sum(s['kind'] == 'bad_param' for s in specs)})")
    print(f"p50_ms {statistics.median(latencies):.0f}")
    print(f"p99_ms {p99:.0f}")
    print(f"images_per_s {good / wall:.1f} ({good} good images in {wall:.1f} s)")
    print(f"server_idle_rss_mb {idle_mb:.0f}")
    print(f"server_peak_rss_mb {sampler.peak:.0f}")
    print(f"traceback_in_responses {sum('Traceback' in text for _, text, _ in results)}")
    print(f"check_failures {len(problems)}")
    for line in problems[:10]:
        print(f"  {line}")
    for name, answer in answers.items():
        print(f"bad input: {name} -> {answer}")
    if attack:
        print(f"good_p99_ms_alone {p99_of(attack['alone']):.0f}")
        print(f"good_p99_ms_under_attack {p99_of(attack['during']):.0f} ({args.attack_clients} clients sending "
              f"{args.attack_side}x{args.attack_side} PNGs)")
        print(f"attack_server_peak_rss_mb {attack['peak']:.0f} (idle {idle_mb:.0f})")
        for key, ms in sorted(attack["answers"].items()):
            print(f"attack: {key} x{len(ms)}, median {statistics.median(ms):.0f} ms")
    for line in hostile:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
