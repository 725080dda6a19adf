"""Folds in parallel: ``train --devices 0,1,2,3`` trains the folds of one train run concurrently,
one process per device entry (`rockcls.training.fold_worker`), each fold in its own fold run
under the one parent run. A device takes the next unfinished fold as soon as its process ends.

A fold process that crashes (an exception, a kill, out of memory) fails its own fold run with
the reason; the other folds go on to the end, so no finished work is lost, and the train run then
fails naming the fold; ``--resume`` trains only the folds that did not finish.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

from rockcls.core import store
from rockcls.core.config import TrainConfig, save_yaml
from rockcls.core.devices import child_device, device_env
from rockcls.core.errors import RockclsError
from rockcls.core.processes import interrupt_processes, sigterm_raises
from rockcls.training.fold_runs import fail_fold_run, find_fold_run, finished_fold_result, load_fold_result

log = logging.getLogger("rockcls")
TAIL_LINES = 30
POLL_S = 0.2


@dataclass
class FoldProcess:
    """One fold's worker process and the last lines it wrote (its failure reason if it dies)."""

    fold: int
    shown: str  # how messages name its device: "GPU 0", "cpu"
    proc: subprocess.Popen
    tail: deque = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    reader: threading.Thread | None = None

    def reason(self) -> str:
        """Why the process failed, in one line: its own error line, else how it ended."""
        code = self.proc.returncode
        how = f"exited with status {code}"
        if code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        errors = [line for line in self.tail if "error" in line.lower() or "Error" in line]
        last = errors[-1] if errors else (self.tail[-1] if self.tail else "")
        return f"fold {self.fold} process on {self.shown} {how}" + (f": {last.strip()[:300]}" if last else "")


def run_folds_in_processes(cfg: TrainConfig, parent_id: str, folds: Sequence[int],
                           devices: Sequence[str]) -> dict[int, dict]:
    """Train ``folds`` of train run ``parent_id`` on ``devices`` (one process at a time per entry)
    and return each fold's result. Finished folds (a resumed run) are collected, not retrained."""
    results: dict[int, dict] = {}
    pending: deque[int] = deque()
    for k in folds:
        run_id, done = find_fold_run(parent_id, k)
        if done:
            results[k] = finished_fold_result(run_id, k)
        else:
            pending.append(k)
    failures: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="rockcls-folds-") as tmp:
        config = Path(tmp) / "config.yaml"
        save_yaml(dataclasses.replace(cfg, devices="", resume="", config=""), config)
        running: dict[int, FoldProcess] = {}  # device slot -> its process
        try:
            with sigterm_raises():  # a stopped train run stops its fold processes too
                schedule(config, parent_id, devices, pending, running, results, failures)
        except BaseException:
            interrupt_processes([fp.proc for fp in running.values()], grace_s=30)
            for fp in running.values():
                fail_fold_run(parent_id, fp.fold, "stopped: the train run was interrupted")
            raise
    if failures:
        first = min(failures)
        raise RockclsError(f"{failures[first]}; {len(results)} of {len(results) + len(failures)} folds "
                           f"finished, resume with --resume {parent_id}")
    return results


def schedule(config: Path, parent_id: str, devices: Sequence[str], pending: deque[int],
             running: dict[int, FoldProcess], results: dict[int, dict], failures: dict[int, str]) -> None:
    """Keep every device busy with the next pending fold until none is pending or running."""
    while pending or running:
        for slot in range(len(devices)):
            if slot not in running and pending:
                running[slot] = start_fold(config, parent_id, pending.popleft(), devices[slot], devices)
        for slot, fp in list(running.items()):
            if fp.proc.poll() is None:
                continue
            del running[slot]
            if fp.reader is not None:
                fp.reader.join(timeout=5)
            collect(fp, parent_id, results, failures)
        time.sleep(POLL_S)


def start_fold(config: Path, parent_id: str, fold: int, device: str, devices: Sequence[str]) -> FoldProcess:
    cmd = [sys.executable, "-m", "rockcls.training.fold_worker", "--config", str(config), "--parent", parent_id,
           "--fold", str(fold), "--device", child_device(device)]
    env = {**device_env(device, devices, os.environ), "MLFLOW_TRACKING_URI": store.tracking_uri(),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    shown = "cpu" if device == "cpu" else f"GPU {device}"
    log.info("fold %d: process %d on %s", fold, proc.pid, shown)
    fp = FoldProcess(fold, shown, proc)
    fp.reader = threading.Thread(target=relay, args=(proc.stdout, fp), daemon=True)
    fp.reader.start()
    return fp


def relay(stream: IO[str], fp: FoldProcess) -> None:
    """The fold process's output on this one's stderr, each line marked with its fold."""
    for line in stream:
        fp.tail.append(line.rstrip("\n"))
        sys.stderr.write(f"[fold {fp.fold}] {line}")
    stream.close()


def collect(fp: FoldProcess, parent_id: str, results: dict[int, dict], failures: dict[int, str]) -> None:
    run_id, done = find_fold_run(parent_id, fp.fold)
    if fp.proc.returncode == 0 and done:
        results[fp.fold] = load_fold_result(run_id)
        return
    failures[fp.fold] = fp.reason()
    fail_fold_run(parent_id, fp.fold, failures[fp.fold])
    log.error("%s", failures[fp.fold])
