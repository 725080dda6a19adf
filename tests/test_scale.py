"""Scale-out: folds in parallel processes (`train --devices`) and one fold across ranks (torchrun, gloo).

The rank tests run real process groups on the CPU with the gloo backend: two ranks must see the
batches one process sees and keep the same hard-negative memory, and a killed rank must fail the
run without leaving a process behind. Every wait is bounded."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from rockcls.core import names
from rockcls.core.errors import ConfigError
from rockcls.data.synthetic import make_dataset
from rockcls.training import distributed
from rockcls.training.distributed import Dist
from rockcls.training.engine import StepSettings, train_one_epoch
from rockcls.training.memory import HardNegativeMemory
from rockcls.training.sampling import MixtureBatchSampler
from rockcls.training.plan import build_plan
from rockcls.training.trainer import run_training
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the sampler's shards

def test_rank_shards_of_a_step_are_the_single_process_batch():
    labels = np.repeat(np.arange(3), [20, 12, 8])
    memory = HardNegativeMemory(16, labels.size)
    memory.update(np.arange(10), np.linspace(0.5, 3.0, 10), np.ones(10, dtype=bool))
    common = dict(accumulation_steps=2, hn_ratio=0.25, balanced_ratio=0.5, memory=memory, seed=5)
    one = MixtureBatchSampler(labels, batch_size=8, **common)
    ranks = [MixtureBatchSampler(labels, batch_size=4, num_replicas=2, rank=r, **common) for r in (0, 1)]
    assert ranks[0].effective_batch_size == one.effective_batch_size == 16
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for epoch in (0, 3):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        for single, a, b in zip(one, *ranks):
            assert len(a) == len(b) == 4
            assert a + b == single
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 2\)"):
        MixtureBatchSampler(labels, batch_size=4, num_replicas=2, rank=2)


# ------------------------------------------------------------------ two gloo ranks vs one process

class Recorded:
    """A loader that remembers the positions of every micro-batch it yields."""

    def __init__(self, loader):
        self.loader, self.seen = loader, []

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y, pos in self.loader:
            self.seen.append(pos.tolist())
            yield x, y, pos


class Pixels(torch.utils.data.Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 3
        self.x = (torch.rand(n, 3, 8, 8, generator=g) * 60 + self.y.view(-1, 1, 1, 1) * 40).to(torch.uint8)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), i


def train_epochs(dist: Dist, batch_size: int, epochs: int = 3) -> dict:
    """Two epochs of a tiny classifier with a hard-negative sampler: what each rank saw and kept."""
    data = Pixels(60)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    net = distributed.wrap(model, dist, torch.device("cpu"), sync_bn=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    memory = HardNegativeMemory(24, len(data))
    sampler = MixtureBatchSampler(data.y.numpy(), batch_size=batch_size, accumulation_steps=2, hn_ratio=0.25,
                                  balanced_ratio=0.5, memory=memory, seed=3, num_replicas=dist.world, rank=dist.rank)
    loader = Recorded(torch.utils.data.DataLoader(data, batch_sampler=sampler))
    settings = StepSettings(device=torch.device("cpu"), mean=(0.5,) * 3, std=(0.25,) * 3, accumulation_steps=2)
    step, losses = 0, []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out = train_one_epoch(net, loader, optimizer, settings, lr_at=lambda s: 0.05, start_step=step,
                              memory=memory, dist=dist)
        step = out["steps"]
        losses.append(out["train_loss"])
    return {"seen": loader.seen, "memory_ids": memory.ids(), "memory_losses": memory.losses(),
            "train_loss": losses, "weight": model[1].weight.detach().clone()}


def _rank_main(rank: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(train_epochs(Dist(rank=rank, world=2, backend="gloo"), batch_size=4), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(target, args: tuple, timeout: float = 120.0) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, *args)) for rank in (0, 1)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join(10)
    assert not alive, "a rank did not finish in time"
    assert [p.exitcode for p in procs] == [0, 0]


def test_two_gloo_ranks_see_the_batches_and_keep_the_memory_of_one_process(tmp_path):
    single = train_epochs(distributed.SINGLE, batch_size=8)
    run_ranks(_rank_main, (f"file://{tmp_path / 'init'}", str(tmp_path / "out")))
    r0, r1 = (torch.load(tmp_path / f"out.{r}", weights_only=False) for r in (0, 1))
    assert len(r0["seen"]) == len(r1["seen"]) == len(single["seen"])
    for a, b, one in zip(r0["seen"], r1["seen"], single["seen"]):
        assert a + b == one  # each micro-batch: rank 0's shard, then rank 1's
    assert len(single["memory_ids"]) > 0
    for r in (r0, r1):  # the memory is the same on every rank, and the same as one process's
        np.testing.assert_array_equal(r["memory_ids"], single["memory_ids"])
        np.testing.assert_allclose(r["memory_losses"], single["memory_losses"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r["train_loss"], single["train_loss"], rtol=1e-4)
        torch.testing.assert_close(r["weight"], single["weight"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ torchrun end to end

def torchrun_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--monitor-interval", "0.5",
            "-m", "rockcls", "train", *args]


def torchrun(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(torchrun_command(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def train_args(data: Path, **extra) -> list[str]:
    base = dict(backbone="test_vit", img_size=32, folds=2, epochs=2, num_workers=0, device="cpu", augment="none",
                hn_ratio=0.25, hn_memory=64, warmup_epochs=0.5, tta="none", experiment="scale")
    base.update(extra)
    out = ["--data", str(data), "--no-pretrained"]
    for k, v in base.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def store_env(mlflow_store: str, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_RUN", "MLFLOW_EXPERIMENT"))}
    env.update(MLFLOW_TRACKING_URI=mlflow_store, ROCKCLS_CACHE_DIR=str(tmp_path / "cache"),
               ROCKCLS_DIST_TIMEOUT="60", PYTHONPATH=str(REPO))
    return env


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not end in {timeout} s:\n{out[-3000:]}")
    return out


def train_runs(client: MlflowClient, experiment: str = "scale") -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{names.KIND}` = 'train'")


def fold_runs(client: MlflowClient, parent_id: str) -> dict[int, object]:
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`{names.PARENT}` = '{parent_id}'")
    return {int(r.data.tags[names.FOLD]): r for r in runs}


def test_torchrun_two_ranks_train_like_one_process(mlflow_store, synthetic_dir, tmp_path):
    # Accumulation (no_sync between micro-batches) and EMA on both sides: 2 ranks x 4 x 2 = 1 x 8 x 2.
    single = run_training(tiny_config(synthetic_dir, backbone="test_vit", batch_size=8, accumulation_steps=2,
                                      ema=0.5, augment="none", hn_ratio=0.25, tta="none", experiment="single"))
    args = train_args(synthetic_dir, batch_size=4, accumulation_steps=2, ema=0.5)
    out = finish(torchrun(args, store_env(mlflow_store, tmp_path)), 240)
    assert "cv_macro_f1" in out, out[-3000:]
    client = MlflowClient()
    (parent,) = train_runs(client)  # one parent run, whatever the number of ranks
    assert parent.info.status == "FINISHED", out[-3000:]
    assert parent.data.params["world_size"] == "2" and parent.data.params["effective_batch_size"] == "16"
    description = parent.data.tags[names.NOTE]
    assert "Each fold on 2 ranks (torchrun), global batch 16." in description
    assert "torchrun --nproc-per-node 2 -m rockcls train" in description
    folds = fold_runs(client, parent.info.run_id)
    assert sorted(folds) == [0, 1] and all(r.info.status == "FINISHED" for r in folds.values())
    assert parent.data.metrics["cv_macro_f1"] == pytest.approx(single.cv_macro_f1, abs=0.02)
    for k, run in folds.items():
        history = client.get_metric_history(run.info.run_id, "val_macro_f1")
        assert [m.step for m in history] == [0, 1]  # logged once, by rank 0
        assert run.data.metrics["oof_macro_f1"] == pytest.approx(single.fold_scores[k], abs=0.02)


class Watched:
    """A command in a session of its own whose output lines are collected as they come."""

    def __init__(self, cmd: list[str], env: dict, *, sigint_ignored: bool = False):
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, preexec_fn=ignore)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, found, timeout: float) -> None:
        """Until a line satisfies ``found`` (the command must still be running)."""
        deadline = time.monotonic() + timeout
        while not any(found(line) for line in list(self.lines)):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text[-3000:]
            time.sleep(0.1)

    def wait(self, timeout: float, what: str) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            pytest.fail(f"{what}:\n{self.text[-3000:]}")
        self.reader.join(10)
        return self.proc.returncode


def _rank_pids(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of the worker processes torchrun started (its children with RANK set)."""
    ranks = {}
    for child in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = int(child)
    return ranks


def test_a_killed_rank_fails_the_run_cleanly_and_resume_finishes_it(mlflow_store, tmp_path):
    data = make_dataset(tmp_path / "train", [40, 40, 40], size=40, seed=2)
    env = store_env(mlflow_store, tmp_path)
    args = train_args(data, batch_size=8, epochs=8, folds=2)
    job = Watched(torchrun_command(args), env)
    job.wait_for(lambda line: "fold 0 epoch 1:" in line, timeout=180)
    ranks = _rank_pids(job.proc.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGKILL)
    assert job.wait(90, "torchrun did not stop after a rank was killed") != 0
    lines = job.lines
    assert not Path(f"/proc/{ranks[0]}").exists() or b"zombie" in Path(f"/proc/{ranks[0]}/status").read_bytes().lower()
    client = MlflowClient()
    (parent,) = train_runs(client)
    assert parent.info.status == "FAILED", "".join(lines)[-3000:]
    assert parent.data.tags[names.FAIL_REASON]
    # The fold run usually ends FAILED too; under heavy load torchrun may SIGKILL rank 0 while it
    # is still ending it, so only the parent is asserted here (resume reopens the fold run either way).
    assert fold_runs(client, parent.info.run_id)[0].info.status in ("FAILED", "RUNNING")

    out = finish(torchrun(args + ["--resume", parent.info.run_id], env), 300)
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED", out[-3000:]
    for run in fold_runs(client, parent.info.run_id).values():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_macro_f1")]
        assert sorted(steps) == list(range(8))  # every epoch once: resumed, not restarted


# ------------------------------------------------------------------ folds in parallel processes

def test_devices_train_the_folds_concurrently_in_processes(devices_run):
    result = devices_run.result  # epochs 2, devices cpu,cpu, hn_ratio 0.25 (tests/conftest.py)
    client = MlflowClient(devices_run.uri)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["cv_macro_f1"] == pytest.approx(result.cv_macro_f1)
    assert np.isfinite(result.oof_logits).all() and result.oof_logits.shape == (72, 3)
    folds = fold_runs(client, result.run_id)
    assert sorted(folds) == [0, 1] and all(r.info.status == "FINISHED" for r in folds.values())
    assert "Folds in parallel, one process each on `cpu,cpu`." in parent.data.tags[names.NOTE]
    # No wall-clock overlap check: a 2-epoch fold of 72 images now trains in about a second, so
    # whether the two processes overlap depends on start-up jitter; benchmarks/scale.py measures it.
    assert result.fold_scores == {k: pytest.approx(r.data.metrics["oof_macro_f1"]) for k, r in folds.items()}


def test_a_crashed_fold_process_fails_its_fold_and_resume_trains_only_that_fold(mlflow_store, tmp_path):
    data = make_dataset(tmp_path / "train", [30, 30, 30], size=40, seed=3)
    env = store_env(mlflow_store, tmp_path)
    args = train_args(data, epochs=6, batch_size=16, backbone="test_efficientnet", devices="cpu,cpu", folds=2)
    cmd = [sys.executable, "-m", "rockcls", "train", *args]
    job = Watched(cmd, env)
    job.wait_for(lambda line: "[fold 1]" in line and "fold 1 epoch 0:" in line, timeout=180)
    lines = job.lines
    pid = next(int(line.split("process ")[1].split()[0]) for line in lines if "fold 1: process" in line)
    os.kill(pid, signal.SIGKILL)
    code = job.wait(180, "train did not end after its fold process was killed")
    text = job.text
    assert code == 2, text[-3000:]
    error = [line for line in lines if line.startswith("rockcls: error:")]
    assert len(error) == 1 and "fold 1 process on cpu killed by SIGKILL" in error[0] and "--resume" in error[0]
    assert "Traceback" not in text
    client = MlflowClient()
    (parent,) = train_runs(client)
    assert parent.info.status == "FAILED"
    folds = fold_runs(client, parent.info.run_id)
    assert folds[0].info.status == "FINISHED"  # the other fold's work is kept
    assert folds[1].info.status == "FAILED" and "SIGKILL" in folds[1].data.tags[names.FAIL_REASON]

    done = subprocess.run(cmd + ["--resume", parent.info.run_id], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fold 0 already finished" in done.stderr and "fold 0: process" not in done.stderr
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(folds[1].info.run_id, "val_macro_f1")]
    assert sorted(steps) == list(range(6))


def test_a_stopped_train_run_stops_its_fold_processes(mlflow_store, tmp_path):
    data = make_dataset(tmp_path / "train", [20, 20, 20], size=40, seed=4)
    cmd = [sys.executable, "-m", "rockcls", "train",
           *train_args(data, epochs=400, batch_size=16, backbone="test_efficientnet", devices="cpu,cpu")]
    # started as a shell's background job is (`cmd &`, nohup): SIGINT ignored, inherited by the fold
    # processes, which must still hear the SIGINT that stops them
    job = Watched(cmd, store_env(mlflow_store, tmp_path), sigint_ignored=True)
    # both folds under way (one thread trains an epoch in a fraction of a second: a fold that started
    # first could otherwise finish before the other logged its first epoch)
    job.wait_for(lambda line: "[fold 0]" in line and "fold 0 epoch 0:" in line, timeout=180)
    job.wait_for(lambda line: "[fold 1]" in line and "fold 1 epoch 0:" in line, timeout=180)
    pids = [int(line.split("process ")[1].split()[0]) for line in job.lines if ": process " in line]
    stopped = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(120, "train did not end after SIGTERM") == 2
    # the fold processes heard the SIGINT: a process deaf to it is killed only after the 30 s grace
    assert time.monotonic() - stopped < 20, job.text[-3000:]
    assert any(line.startswith("rockcls: error: terminated by SIGTERM") for line in job.lines), job.text[-3000:]
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # no fold process left running
    client = MlflowClient()
    (parent,) = train_runs(client)
    assert parent.info.status == "FAILED" and "SIGTERM" in parent.data.tags[names.FAIL_REASON]
    # KILLED as each process ends its own run, or FAILED by the train process when an interrupted
    # process could not (the interrupt can land inside its store's transaction); never FINISHED
    folds = {r.info.status: r.data.tags.get(names.FAIL_REASON) for r in fold_runs(client, parent.info.run_id).values()}
    assert set(folds) <= {"KILLED", "FAILED"}, folds


def test_kill_ends_an_in_process_train_run_failed_with_the_reason(mlflow_store, tmp_path):
    """`kill PID` (SIGTERM) of a train without --devices: Python's default died on the spot and left
    the train run and its fold run RUNNING for ever; they now end FAILED with the reason."""
    data = make_dataset(tmp_path / "train", [20, 20, 20], size=40, seed=4)
    cmd = [sys.executable, "-m", "rockcls", "train",
           *train_args(data, epochs=400, batch_size=16, backbone="test_efficientnet", num_workers=1)]
    job = Watched(cmd, store_env(mlflow_store, tmp_path), sigint_ignored=True)
    job.wait_for(lambda line: "fold 0 epoch 1:" in line, timeout=180)
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(60, "train did not end after SIGTERM") == 2
    assert any(line.startswith("rockcls: error: terminated by SIGTERM") for line in job.lines), job.text[-3000:]
    assert "Traceback" not in job.text, job.text[-3000:]
    client = MlflowClient()
    (parent,) = train_runs(client)
    assert parent.info.status == "FAILED" and "SIGTERM" in parent.data.tags[names.FAIL_REASON]
    (fold,) = fold_runs(client, parent.info.run_id).values()
    assert fold.info.status == "FAILED" and "SIGTERM" in fold.data.tags[names.FAIL_REASON]


def test_torchrun_settings_that_cannot_work_are_refused_before_any_collective(mlflow_store, synthetic_dir):
    two = Dist(rank=0, world=2, backend="gloo")  # no process group: a collective would fail
    with pytest.raises(ConfigError, match="sync_bn: SyncBatchNorm works on GPUs only"):
        build_plan(tiny_config(synthetic_dir, sync_bn=True), two)
    with pytest.raises(ConfigError, match="devices: folds in parallel processes and torchrun do not mix"):
        build_plan(tiny_config(synthetic_dir, devices="cpu,cpu"), two)


def test_devices_refuse_bad_entries_and_an_epoch_hook(mlflow_store, synthetic_dir):
    with pytest.raises(ConfigError, match="devices: 'gpu1' is neither a GPU id"):
        run_training(tiny_config(synthetic_dir, devices="cpu,gpu1"))
    with pytest.raises(ConfigError, match="devices: an epoch or fold hook"):
        run_training(tiny_config(synthetic_dir, devices="cpu,cpu"), on_epoch_end=lambda *a: None)
