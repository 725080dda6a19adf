"""Worker processes, one per device (GPU id or cpu), each running trials until no ticket is left; `python -m rockcls.search.workers --plan PLAN` is one worker."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

import optuna

from rockcls.core import store, tracking
from rockcls.core.config import with_overrides
from rockcls.core.devices import child_device, device_env
from rockcls.core.processes import hear_interrupts, interrupt_processes
from rockcls.search.pruning import build_pruner
from rockcls.search.space import StudyPlan, build_sampler, quiet_optuna
from rockcls.search.storage import build_storage
from rockcls.search.tickets import ATTR_RUN, NoTicketLeft, TicketStudy
from rockcls.search.trial import Objective, TrialRecorder

log = logging.getLogger("rockcls")


def run_worker(plan: StudyPlan, worker: int = 0, device: str | None = None) -> None:
    """Run tickets of the study until none is left (or the timeout passes)."""
    quiet_optuna()
    if device:
        plan = dataclasses.replace(plan, base=with_overrides(plan.base, device=device))
    storage = build_storage(plan.storage_url, heartbeat=plan.tune.heartbeat, retries=plan.tune.retries)
    probe = optuna.load_study(study_name=plan.study_name, storage=storage)
    study_run_id = probe.user_attrs[ATTR_RUN]
    seen = sum(1 for t in probe.get_trials(deepcopy=False) if t.params)
    timeout = plan.tune.timeout or None
    study = TicketStudy(study_name=plan.study_name, storage=storage, sampler=build_sampler(plan, worker, seen),
                        pruner=build_pruner(plan.tune, plan.steps), target=plan.tune.trials,
                        deadline=time.monotonic() + timeout if timeout else None)
    try:
        study.optimize(Objective(plan, study_run_id), timeout=timeout, catch=(Exception,),
                       callbacks=[TrialRecorder(plan, study_run_id)], gc_after_trial=True)
    except NoTicketLeft:
        pass


def launch_workers(plan: StudyPlan, devices: Sequence[str]) -> list[int]:
    """One worker process per device; returns their exit codes."""
    with tempfile.TemporaryDirectory(prefix="rockcls-study-") as tmp:
        spec = Path(tmp) / "plan.json"
        spec.write_text(plan.to_json())
        spec.chmod(0o600)  # the storage URL may hold a password
        procs = []
        for i, dev in enumerate(devices):
            cmd = [sys.executable, "-m", "rockcls.search.workers", "--plan", str(spec), "--worker", str(i),
                   "--device", child_device(dev)]
            procs.append(subprocess.Popen(cmd, env=worker_env(dev, devices, os.environ)))
            log.info("worker %d: pid %d on %s", i, procs[-1].pid, "cpu" if dev == "cpu" else f"GPU {dev}")
        try:
            return [p.wait() for p in procs]
        except BaseException:  # interrupted, or Terminated by SIGTERM: the workers stop too
            interrupt_processes(procs)
            raise


def worker_env(device: str, devices: Sequence[str], parent: Mapping[str, str]) -> dict[str, str]:
    """A worker's environment: pinned to its device, logging to this process's tracking store."""
    return {**device_env(device, devices, parent), "MLFLOW_TRACKING_URI": store.tracking_uri()}


def run_in_process(plan: StudyPlan) -> int:
    run_worker(plan, 0)
    return 0


def build_worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rockcls.search.workers",
                                     description="one worker of a rockcls study (started by search/tune.py)")
    parser.add_argument("--plan", required=True, help="JSON plan written by the tune process")
    parser.add_argument("--worker", type=int, default=0, help="worker index (seeds the sampler)")
    parser.add_argument("--device", default="", help="train device of this worker (cpu, cuda)")
    return parser


def worker_main(argv: list[str] | None = None) -> int:
    args = build_worker_parser().parse_args(argv)
    hear_interrupts()  # the tune process stops this one with SIGINT
    tracking.set_program("search/tune.py (worker)")
    plan = StudyPlan.from_json(Path(args.plan).read_text())
    run_worker(plan, args.worker, args.device or None)
    return 0


if __name__ == "__main__":
    from rockcls.core.entry import run_command
    from rockcls.core.progress import setup_logging

    setup_logging()
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s w%(process)d %(levelname)s %(message)s", "%H:%M:%S"))
    sys.exit(run_command(worker_main, sys.argv[1:]))
