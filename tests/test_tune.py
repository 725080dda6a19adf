"""Tests for the Optuna study (rockcls.search, search/tune.py): tiny models on 40 synthetic images, CPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from rockcls.training.models import automatic_lr
from rockcls.core import devices, names, secrets
from rockcls.core.config import AUTO_LR_PRETRAINED, TrainConfig, build_config, config_from_args
from rockcls.core.entry import run_command
from rockcls.core.errors import ConfigError
from rockcls.core.processes import stop_process_group, wait_for_http
from rockcls.data.synthetic import make_dataset
from rockcls.inference.predictor import Predictor
from rockcls.runs import lookup as predict_lookup
from rockcls.search import bookkeeping as search_bookkeeping
from rockcls.search import pruning as search_pruning
from rockcls.search import space as search_space
from rockcls.search import storage as search_storage
from rockcls.search import study as search_study
from rockcls.search import tickets as search_tickets
from rockcls.search import trial as search_trial
from rockcls.search import workers as search_workers
from tests import postgres
from tests.conftest import use_store

ROOT = Path(__file__).resolve().parents[1]
TUNE = ROOT / "search" / "tune.py"
TRAIN_ARGS = ["--backbone", "test_efficientnet", "--pretrained", "false", "--img-size", "32", "--batch-size", "16",
              "--num-workers", "0", "--hn-memory", "32", "--warmup-epochs", "0.5", "--device", "cpu"]
STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def load_tune():
    spec = importlib.util.spec_from_file_location("rockcls_tune_script", TUNE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tune = load_tune()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """40 synthetic images in 3 imbalanced classes, shared by every test here."""
    return make_dataset(tmp_path_factory.mktemp("tune-data") / "train", [16, 14, 10], size=40, seed=1)


def trial_runs(client: MlflowClient, study_run_id: str) -> dict[int, object]:
    exp = client.get_run(study_run_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{study_run_id}' and tags.`rockcls.kind` = 'trial'")
    numbers = [int(r.data.tags["rockcls.trial"]) for r in runs]
    assert len(numbers) == len(set(numbers)), f"two MLflow runs for one trial: {sorted(numbers)}"
    return dict(zip(numbers, runs))


def load_study(storage: str) -> optuna.Study:
    names = [s.study_name for s in optuna.get_all_study_summaries(storage) if ".finalised-" not in s.study_name]
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


# ---------------------------------------------------------------------------- one 6-trial study, looked at from several sides

SIX = ["--trials", "6", "--epochs", "2", "--search-lr", "1e-4:1e-1", "--pruner", "median", "--pruner-startup", "2",
       "--pruner-warmup", "0", "--sampler-startup", "10", "--baseline", "false", "--top-k", "2", "--register", "tunetest"]


def with_arg(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


@pytest.fixture(scope="module")
def six(tmp_path_factory, data_dir):
    """A 6-trial median-pruned study, run through the CLI. The third training raises mid-trial;
    the fifth and sixth report macro-F1 0 (as a diverging run would) so that pruning does not
    hang on how well 40 tiny images happen to train."""
    root = tmp_path_factory.mktemp("six")
    argv = ["--data", str(data_dir), *TRAIN_ARGS, *SIX]
    real = search_trial.run_training
    calls = []

    def flaky(cfg, **kwargs):
        calls.append(cfg.lr)
        report = kwargs["on_epoch_end"]
        if len(calls) == 3:
            def diverge(fold, epoch, metrics):
                raise FloatingPointError("loss is nan (injected)")
            kwargs["on_epoch_end"] = diverge
        elif len(calls) in (5, 6):
            kwargs["on_epoch_end"] = lambda fold, epoch, metrics: report(fold, epoch, {**metrics, "val_macro_f1": 0.0})
        return real(cfg, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root)
        mp.setattr(search_trial, "run_training", flaky)  # where the objective looks it up
        start = time.perf_counter()
        code = run_command(tune.main, argv)
        seconds = time.perf_counter() - start
        storage = f"sqlite:///{root / 'optuna.db'}"
        study = load_study(storage)
        yield {"code": code, "argv": argv, "root": root, "storage": storage, "study": study,
               "run_id": study.user_attrs[search_tickets.ATTR_RUN], "client": MlflowClient(), "seconds": seconds}
    mlflow.set_tracking_uri(None)


def test_six_trial_study_finishes_with_pruned_and_completed_trials(six):
    assert six["code"] == 0
    states = [t.state for t in six["study"].get_trials()]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 6
    assert states.count(TrialState.COMPLETE) >= 2 and states.count(TrialState.PRUNED) >= 2
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    for t in six["study"].get_trials(states=(TrialState.PRUNED,)):
        assert len(t.intermediate_values) == 1, "a pruned trial stops at once, before its last epoch"


def test_mlflow_status_of_each_trial_run_matches_its_optuna_state(six):
    runs = trial_runs(six["client"], six["run_id"])
    trials = six["study"].get_trials()
    assert sorted(runs) == [t.number for t in trials]
    for t in trials:
        run = runs[t.number]
        assert run.info.status == STATUS[t.state.name], (t.number, t.state, run.info.status)
        assert run.data.tags["rockcls.trial_state"] == t.state.name
        assert run.data.tags["rockcls.kind"] == "trial"
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])
        history = six["client"].get_metric_history(run.info.run_id, "val_macro_f1")
        assert {m.step: m.value for m in history} == pytest.approx(t.intermediate_values)
    study_run = six["client"].get_run(six["run_id"])
    assert study_run.data.tags["rockcls.kind"] == "study"
    assert study_run.data.tags["rockcls.storage"] == six["storage"]
    assert study_run.info.status == "FINISHED"


def test_trial_that_raises_is_failed_with_its_reason_and_replaced(six):
    failed = six["study"].get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1
    assert failed[0].user_attrs[search_bookkeeping.REASON] == "FloatingPointError: loss is nan (injected)"
    slot = failed[0].user_attrs[search_tickets.SLOT]
    retry = [t for t in six["study"].get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
             if t.user_attrs[search_tickets.SLOT] == slot]
    assert len(retry) == 1 and retry[0].user_attrs[search_tickets.ATTEMPT] == 1 and retry[0].number > failed[0].number
    run = trial_runs(six["client"], six["run_id"])[failed[0].number]
    assert run.info.status == "FAILED"
    assert run.data.tags[search_bookkeeping.REASON] == "FloatingPointError: loss is nan (injected)"


def test_study_run_holds_summary_plots_and_the_registered_ensemble(six):
    client, run_id, study = six["client"], six["run_id"], six["study"]
    files = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"best_params.json", "trials.csv", "study.yaml", "plots/optimization_history.png",
            "plots/intermediate_values.png"} <= files
    best = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="best_params.json")).read_text())
    assert best["trial"] == study.best_trial.number and best["params"] == pytest.approx(study.best_params)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["trials_pruned"] == len(study.get_trials(states=(TrialState.PRUNED,)))
    assert metrics["epochs_saved"] == sum(2 - len(t.intermediate_values) for t in study.get_trials(states=(TrialState.PRUNED,)))
    ensemble_run = client.get_run(client.get_run(run_id).data.tags["rockcls.ensemble_run"])
    assert ensemble_run.data.tags["mlflow.parentRunId"] == run_id and ensemble_run.info.status == "FINISHED"
    top2 = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value, reverse=True)[:2]
    assert ensemble_run.data.tags["rockcls.members"].split(",") == [t.user_attrs[search_bookkeeping.RUN_ID] for t in top2]
    assert metrics["ensemble_macro_f1"] == pytest.approx(ensemble_run.data.metrics["ensemble_macro_f1"])
    version = client.get_model_version_by_alias("tunetest", "champion")
    assert version.tags["rockcls.ensemble_run"] == ensemble_run.info.run_id


def test_study_run_charts_the_best_value_so_far_over_finished_trials_and_describes_itself(six):
    client, run_id, study = six["client"], six["run_id"], six["study"]
    # step = complete + pruned trials so far (one process: trials finish in number order); a failed
    # trial is replaced, so it does not advance the curve
    finished = [t for t in study.get_trials() if t.state in search_tickets.FINISHED]
    expected, best = {}, None
    for step, t in enumerate(finished, start=1):
        if t.state == TrialState.COMPLETE:
            best = t.value if best is None else max(best, t.value)
        if best is not None:
            expected[step] = best
    curve = {m.step: m.value for m in client.get_metric_history(run_id, "best_macro_f1")}
    assert curve == pytest.approx(expected) and len(curve) >= 2  # a curve, not a single dot
    pruned = {m.step: m.value for m in client.get_metric_history(run_id, "trials_pruned")}
    assert sorted(pruned) == list(range(1, len(finished) + 1))
    note = client.get_run(run_id).data.tags["mlflow.note.content"]
    assert f"**Best trial {study.best_trial.number}: macro-F1 {study.best_value:.4f}**" in note
    assert "python search/tune.py --trials 6 " in note and f"--data {six['argv'][1]}" in note


def test_rerun_resumes_to_the_same_total_and_more_trials_continue_it(six):
    study, before = six["study"], len(six["study"].get_trials())
    assert run_command(tune.main, six["argv"]) == 0
    assert len(study.get_trials()) == before, "re-running a finished study must not add trials"
    assert len(MlflowClient().search_model_versions("name = 'tunetest'")) == 1

    more = with_arg(six["argv"], "--trials", "7")
    assert run_command(tune.main, more) == 0
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 7 and len(study.get_trials()) == before + 1
    assert sorted(t.user_attrs[search_tickets.SLOT] for t in finished) == list(range(7))


def test_rerun_with_changed_settings_is_refused(six, capsys):
    name = six["study"].study_name
    argv = with_arg(six["argv"], "--epochs", "3") + ["--study-name", name]
    assert run_command(tune.main, argv) == 2
    err = capsys.readouterr().err
    assert f"rockcls: error: study '{name}' was created with other settings (fixed.epochs: 2 -> 3)" in err


# ---------------------------------------------------------------------------- workers

def test_two_worker_processes_finish_exactly_n_trials(mlflow_store, tmp_path, data_dir):
    base, fixed = search_space.build_search_config(dict(
        data=str(data_dir), backbone="test_efficientnet", pretrained=False, img_size=32, epochs=1, batch_size=16,
        num_workers=0, hn_memory=32, warmup_epochs=0.5))
    tune_cfg = build_config(search_space.TuneConfig, dict(trials=4, devices="cpu,cpu", pruner="none", top_k=0,
                                                       register=""))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    overlap = OverlapWorkers(storage)
    overlap.start()
    outcome = search_study.run_study(base, tune_cfg, fixed)
    overlap.join()
    assert outcome.worker_codes == [0, 0]
    study = load_study(storage)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4, "exactly 4 trials, none extra"
    assert sorted(t.user_attrs[search_tickets.SLOT] for t in trials) == list(range(4))
    assert len({t.user_attrs[names.WORKER] for t in trials}) == 2 == len(overlap.workers), "both workers ran trials"
    runs = trial_runs(MlflowClient(), outcome.study_run_id)
    assert sorted(runs) == [t.number for t in trials]
    assert all(r.info.status == "FINISHED" and r.data.tags.get("rockcls.complete") == "true" for r in runs.values())


class OverlapWorkers(threading.Thread):
    """Make two worker processes share the study whatever their start-up times: pause the first
    worker seen running a trial (SIGSTOP, a process this test started) until another worker has
    claimed one. Without this a fast-starting worker may finish every trial alone."""

    def __init__(self, storage: str, timeout_s: float = 300.0):
        super().__init__(daemon=True)
        self.storage, self.timeout_s, self.workers = storage, timeout_s, set()

    def trials(self) -> list:
        try:
            return optuna.load_study(study_name=load_study(self.storage).study_name, storage=self.storage).get_trials()
        except Exception:  # not created yet, or the database is busy
            return []

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and len(self.workers) < 2:
            trials = self.trials()
            self.workers = {t.user_attrs[names.WORKER] for t in trials if names.WORKER in t.user_attrs}
            if trials and not any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials):
                return  # the study ended
            running = sorted(t.user_attrs[names.WORKER] for t in trials
                             if t.state == TrialState.RUNNING and names.WORKER in t.user_attrs)
            if len(self.workers) >= 2 or not running:
                time.sleep(0.2)
                continue
            pid = int(running[0].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGSTOP)
            try:
                end = time.monotonic() + 10  # short: the paused process may hold a SQLite lock
                while time.monotonic() < end and len(self.workers) < 2:
                    time.sleep(0.2)
                    self.workers |= {t.user_attrs[names.WORKER] for t in self.trials()
                                     if names.WORKER in t.user_attrs}
            finally:
                os.kill(pid, signal.SIGCONT)


QUEUE_WORKER = textwrap.dedent("""
    import os, sys, time
    import optuna
    from rockcls.search import space as sp, storage as st, tickets as tk
    sp.quiet_optuna()
    storage = st.build_storage(sys.argv[1], heartbeat=5, retries=0)
    study = tk.TicketStudy(study_name="queue", storage=storage, sampler=optuna.samplers.RandomSampler(),
                          pruner=optuna.pruners.NopPruner(), target=int(sys.argv[2]), poll_s=0.05)
    open(sys.argv[3] + ".ready", "w").close()
    while len([p for p in os.listdir(os.path.dirname(sys.argv[3])) if p.endswith(".ready")]) < 2:
        time.sleep(0.05)  # start together, so the processes really compete for tickets
    ran = []
    def objective(trial):
        ran.append(trial.number)
        time.sleep(0.05)  # a trial takes time; an instant one lets one process win every claim
        return trial.suggest_float("x", 0, 1)
    try:
        study.optimize(objective)
    except tk.NoTicketLeft:
        pass
    with open(sys.argv[3], "w") as f:
        f.write(" ".join(map(str, ran)))
""")


def test_sqlite_ticket_queue_hands_each_trial_to_exactly_one_process(tmp_path):
    """Plain Optuna on SQLite now and then hands one queued trial to two processes (measured: 21 of
    300 with 3 processes); the storage rockcls builds must not."""
    url, n = f"sqlite:///{tmp_path / 'queue.db'}", 40
    storage = search_storage.build_storage(url, heartbeat=5, retries=0)
    queue = optuna.create_study(study_name="queue", storage=storage)
    search_tickets.top_up_tickets(queue, n)
    outs = [tmp_path / f"ran{i}.txt" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", QUEUE_WORKER, url, str(n), str(out)]) for out in outs]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    ran = [int(x) for out in outs for x in out.read_text().split()]
    assert sorted(ran) == list(range(n)), "every ticket run once, by one process"
    assert all(out.read_text().split() for out in outs), "every process ran tickets"
    assert [t.state for t in queue.get_trials()] == [TrialState.COMPLETE] * n


DIES_AFTER_CLAIM = textwrap.dedent("""
    import os, signal, sys
    import optuna
    from rockcls.search import space as sp, storage as st, tickets as tk
    sp.quiet_optuna()
    storage = st.build_storage(sys.argv[1], heartbeat=1, retries=1)
    study = tk.TicketStudy(study_name="queue", storage=storage, sampler=optuna.samplers.RandomSampler(),
                          pruner=optuna.pruners.NopPruner(), target=1)
    study.ask()  # the ticket is ours: now die before Optuna's heartbeat thread ever starts
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_worker_killed_right_after_claiming_a_ticket_is_retried_by_another(tmp_path):
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    storage = search_storage.build_storage(url, heartbeat=1, retries=1)
    search_tickets.top_up_tickets(optuna.create_study(study_name="queue", storage=storage), 1)
    victim = subprocess.run([sys.executable, "-c", DIES_AFTER_CLAIM, url], timeout=120)
    assert victim.returncode == -signal.SIGKILL
    assert [t.state for t in optuna.load_study(study_name="queue", storage=url).get_trials()] == [TrialState.RUNNING]

    # --timeout 0 waits for running trials without limit; this bound only keeps a failure from hanging.
    survivor = search_tickets.TicketStudy(study_name="queue", storage=storage, sampler=optuna.samplers.RandomSampler(),
                                     pruner=optuna.pruners.NopPruner(), target=1, poll_s=0.2,
                                     deadline=time.monotonic() + 120)
    try:
        survivor.optimize(lambda trial: 1.0)
    except search_tickets.NoTicketLeft:
        pass
    states = [(t.state, t.system_attrs.get("failed_trial")) for t in survivor.get_trials()]
    assert states == [(TrialState.FAIL, None), (TrialState.COMPLETE, 0)]


def test_killed_worker_trial_is_failed_and_retried(mlflow_store, tmp_path, data_dir):
    argv = ["--data", str(data_dir), *TRAIN_ARGS, "--trials", "2", "--epochs", "3", "--pruner", "none",
            "--heartbeat", "1", "--top-k", "0", "--register", ""]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = subprocess.Popen([sys.executable, str(TUNE), *argv], env={**os.environ, "OMP_NUM_THREADS": "1"})
    victim = wait_for_trial_mid_way(storage, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    assert run_command(tune.main, argv) == 0
    study = load_study(storage)
    killed = study.get_trials()[victim]
    assert killed.state == TrialState.FAIL
    retry = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == victim]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == killed.params
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    client = MlflowClient()
    run = trial_runs(client, study.user_attrs[search_tickets.ATTR_RUN])[victim]
    assert run.info.status == "FAILED" and run.data.tags[search_bookkeeping.REASON] == "worker lost (no heartbeat)"
    folds = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert folds and "RUNNING" not in {f.info.status for f in folds}, "no run of the lost trial left RUNNING"


def wait_for_trial_mid_way(storage: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> int:
    """Freeze ``proc`` (SIGSTOP) while one of its trials is RUNNING and has reported an epoch;
    returns that trial's number (the caller then kills the process)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the tune process ended before it could be killed"
        try:
            study = load_study(storage)
        except Exception:  # not created yet
            time.sleep(0.5)
            continue
        running = [t.number for t in study.get_trials(states=(TrialState.RUNNING,)) if t.intermediate_values]
        if running:
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                still_running = study.get_trials()[running[0]].state == TrialState.RUNNING
            except optuna.exceptions.StorageInternalError:  # frozen while holding SQLite's write lock
                still_running = False
            if still_running:
                return running[0]
            os.kill(proc.pid, signal.SIGCONT)  # it finished meanwhile, or holds the lock: try again
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no trial reached its first epoch in time")


# ---------------------------------------------------------------------------- many machines, on one

@pytest.fixture(scope="module")
def pg_cluster():
    reason = postgres.unavailable_reason()
    if reason:
        pytest.skip(f"PostgreSQL test skipped: {reason}")
    cluster = postgres.start_cluster()
    yield cluster
    cluster.stop()


def start_mlflow_server(backend: str, artifacts: Path, log_file: Path) -> tuple[subprocess.Popen, str]:
    port = postgres.free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend,
           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(cmd, env=env, stdout=log_file.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    why = wait_for_http(server, f"{url}/health", timeout=120)
    if not why:
        return server, url
    stop_process_group(server)
    raise AssertionError(f"mlflow server {why}: {log_file.read_text()[-2000:]}")


def test_postgres_storage_and_tracking_server_with_two_tune_processes(pg_cluster, tmp_path, data_dir, monkeypatch):
    """Two tune processes (as two machines would) share a PostgreSQL study and an MLflow server
    backed by PostgreSQL: exactly N trials, one study run, one finalisation, password masked."""
    backend = pg_cluster.create_database("mlflow")
    pg_cluster.create_database("optuna")
    storage = f"postgresql://postgres:s3cret@127.0.0.1:{pg_cluster.port}/optuna"  # trust auth ignores it
    server, url = start_mlflow_server(backend, tmp_path / "artifacts", tmp_path / "server.log")
    try:
        monkeypatch.chdir(tmp_path)
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "ROCKCLS_CACHE_DIR": str(tmp_path / "cache"),
               "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, str(TUNE), "--data", str(data_dir), *TRAIN_ARGS, "--epochs", "1", "--trials", "4",
                "--storage", storage, "--study-name", "rock-pg", "--pruner", "none", "--top-k", "2",
                "--register", "pgmodel"]
        machines = []
        for name in ("machine-a", "machine-b"):
            (tmp_path / name).mkdir()
            machines.append(subprocess.Popen(argv, env=env, cwd=tmp_path / name))
        overlap = OverlapWorkers(search_storage.resolve_storage_url(storage, ""))
        overlap.run()
        assert [m.wait(timeout=400) for m in machines] == [0, 0]
        assert len(overlap.workers) == 2

        study = optuna.load_study(study_name="rock-pg", storage=search_storage.resolve_storage_url(storage, ""))
        trials = study.get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
        assert len({t.user_attrs[names.WORKER] for t in trials}) == 2, "both processes ran trials"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        client = MlflowClient()
        exp = client.get_experiment_by_name("rockcls")
        studies = client.search_runs([exp.experiment_id], "tags.`rockcls.kind` = 'study'")
        assert len(studies) == 1 and studies[0].info.status == "FINISHED"
        tags = studies[0].data.tags
        assert tags["rockcls.storage"] == f"postgresql+psycopg2://postgres:***@127.0.0.1:{pg_cluster.port}/optuna"
        study_yaml = Path(mlflow.artifacts.download_artifacts(run_id=studies[0].info.run_id, artifact_path="study.yaml",
                                                              dst_path=str(tmp_path / "dl")))
        assert not any("s3cret" in v for v in [*tags.values(), *studies[0].data.params.values(), study_yaml.read_text()])
        runs = trial_runs(client, studies[0].info.run_id)
        assert sorted(runs) == [0, 1, 2, 3] and all(r.info.status == "FINISHED" for r in runs.values())
        assert len(client.search_runs([exp.experiment_id], "tags.`rockcls.kind` = 'ensemble'")) == 1
        assert [v.version for v in client.search_model_versions("name = 'pgmodel'")] == ["1"]
    finally:
        mlflow.set_tracking_uri(None)
        stop_process_group(server)


# ---------------------------------------------------------------------------- settings

def test_search_space_parses_ranges_and_choices_and_names_bad_specs():
    lr = search_space.parse_dimension("lr", "1e-5:1e-2")
    assert (lr.low, lr.high, lr.log, lr.integer) == (1e-5, 1e-2, True, False)
    mem = search_space.parse_dimension("hn_memory", "64:4096")
    assert (mem.low, mem.high, mem.log, mem.integer) == (64, 4096, True, True)
    assert search_space.parse_dimension("hn_memory", "0,256,1024").choices == (0, 256, 1024)
    assert search_space.parse_dimension("augment", "light,seed").choices == ("light", "seed")
    with pytest.raises(ConfigError, match=r"search_hn_ratio: must be <= 1.0, got 1.5"):
        search_space.parse_dimension("hn_ratio", "0:1.5")
    with pytest.raises(ConfigError, match=r"search_hn_memory: hn_memory is searched on a log scale"):
        search_space.parse_dimension("hn_memory", "0:4096")
    with pytest.raises(ConfigError, match=r"search_lr: expected LOW:HIGH with LOW < HIGH"):
        search_space.parse_dimension("lr", "1e-2:1e-5")
    with pytest.raises(ConfigError, match=r"search_augment: must be one of"):
        search_space.parse_dimension("augment", "seed,strong")
    with pytest.raises(ConfigError, match=r"to fix lr for all trials pass --lr"):
        search_space.parse_dimension("lr", "0.001")


def test_given_train_parameters_are_fixed_and_folds_default_to_one(tmp_path):
    base, fixed = search_space.build_search_config({"data": "x", "lr": "0.01", "hn_ratio": None})
    assert base.folds == 1 and base.lr == 0.01 and fixed == ["lr"]
    space = search_space.build_search_space(search_space.TuneConfig(), base, fixed)
    assert [d.name for d in space] == ["hn_ratio", "balanced_ratio", "hn_memory"]
    yaml_file = tmp_path / "fixed.yaml"
    yaml_file.write_text("folds: 3\nhn_memory: 256\n")
    base, fixed = search_space.build_search_config({"data": "x", "config": str(yaml_file)})
    assert base.folds == 3 and base.hn_memory == 256 and fixed == ["hn_memory"]
    with pytest.raises(ConfigError, match="nothing to search"):
        search_space.build_search_space(search_space.TuneConfig(), base, ["lr", "hn_ratio", "balanced_ratio", "hn_memory"])
    with pytest.raises(ConfigError, match="resume: not used by tune"):
        search_space.build_search_config({"data": "x", "resume": "abc"})


def test_auto_lr_range_is_centred_on_the_automatic_rate_and_the_baseline_uses_that_rate():
    tune = search_space.TuneConfig()
    scratch, _ = search_space.build_search_config({"data": "x", "pretrained": False})
    pretrained, _ = search_space.build_search_config({"data": "x", "pretrained": True})
    for base in (scratch, pretrained):
        lr = {d.name: d for d in search_space.build_search_space(tune, base)}["lr"]
        low, high = search_space.AUTO_LR_SPAN
        assert lr.log and lr.low == pytest.approx(automatic_lr(base) / low) and lr.high == pytest.approx(automatic_lr(base) * high)
        assert search_space.baseline_params([lr], base) == {"lr": automatic_lr(base)}
    assert automatic_lr(scratch) != automatic_lr(pretrained)
    explicit = search_space.build_search_space(search_space.TuneConfig(search_lr="1e-5:1e-4"), scratch)
    assert (explicit[0].low, explicit[0].high) == (1e-5, 1e-4)
    assert search_space.baseline_params(explicit, scratch) == {k: getattr(scratch, k) for k in ("hn_ratio", "balanced_ratio", "hn_memory")}


def test_storage_urls_default_beside_mlflow_rewrite_postgres_and_mask_passwords(monkeypatch):
    monkeypatch.delenv(secrets.STORAGE_ENV, raising=False)
    assert search_storage.resolve_storage_url("", "sqlite:////data/exp/mlflow.db") == "sqlite:////data/exp/optuna.db"
    assert search_storage.resolve_storage_url("postgresql://u:pw@db:5432/optuna", "") == "postgresql+psycopg2://u:pw@db:5432/optuna"
    assert secrets.mask_url("postgresql+psycopg2://u:pw@db:5432/optuna") == "postgresql+psycopg2://u:***@db:5432/optuna"
    # Generated passwords hold '@', ':' and '/': everything up to the last '@' is user info.
    assert secrets.mask_url("postgresql://u:p@ss:w/rd@db/optuna") == "postgresql://u:***@db/optuna"
    assert secrets.mask_url("sqlite:///file:/x.db?uri=true&PASSWORD=pw&a=1") == "sqlite:///file:/x.db?uri=true&PASSWORD=***&a=1"
    assert secrets.mask_url("sqlite:////data/a@b/mlflow.db") == "sqlite:////data/a@b/mlflow.db"
    with pytest.raises(ConfigError, match="storage: 'optuna.db' is not a database URL"):
        search_storage.resolve_storage_url("optuna.db", "")
    monkeypatch.setenv(secrets.STORAGE_ENV, "postgresql://u@db/optuna")  # password in ~/.pgpass
    assert search_storage.resolve_storage_url("", "") == "postgresql+psycopg2://u@db/optuna"
    assert search_storage.resolve_storage_url("sqlite:///given.db", "") == "sqlite:///given.db"
    monkeypatch.setenv(secrets.STORAGE_ENV, "u:hunter2@db")
    with pytest.raises(ConfigError, match=r"^ROCKCLS_STORAGE: 'u:\*\*\*@db' is not a database URL"):
        search_storage.resolve_storage_url("", "")


def test_remembered_passwords_are_masked_in_every_log_record_and_error_line(capsys):
    secrets.remember("postgresql://u:Zq81-p@ss@db/optuna")
    record = logging.LogRecord("sqlalchemy", logging.ERROR, __file__, 1, "connect to %s failed", ("u:Zq81-p@ss@db",), None)
    assert secrets.SecretFilter().filter(record) and record.getMessage() == "connect to u:***@db failed"

    def fails(argv):
        raise ConfigError("storage: driver said password Zq81-p@ss is wrong")

    assert run_command(fails, []) == 2
    assert capsys.readouterr().err == "rockcls: error: storage: driver said password *** is wrong\n"


def grep_tree(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_storage_password_from_the_environment_reaches_no_store_file_log_or_output(
        mlflow_store, tmp_path, data_dir, monkeypatch, capsys, caplog):
    secret = "Zq81sEcReT9xK"  # shares nothing with the passwords other tests make `secrets` remember
    # SQLite ignores unknown URI parameters, so this storage carries a password like a server URL would.
    monkeypatch.setenv(secrets.STORAGE_ENV, f"sqlite:///file:{tmp_path / 'optuna.db'}?uri=true&password={secret}")
    caplog.set_level(logging.DEBUG)
    argv = ["--data", str(data_dir), *TRAIN_ARGS, "--trials", "2", "--epochs", "1", "--pruner", "none",
            "--top-k", "1", "--register", "secret-test"]
    assert run_command(tune.main, argv) == 0
    out = capsys.readouterr()
    assert "password=***" in out.out  # the summary names the storage, masked
    client = MlflowClient()
    study_run = client.search_runs([client.get_experiment_by_name("rockcls").experiment_id],
                                   "tags.`rockcls.kind` = 'study'")[0]
    assert study_run.data.tags["rockcls.storage"].endswith("password=***")
    assert (tmp_path / "optuna.db").stat().st_size > 0
    # the whole tracking store (database bytes, artifacts, registered model) and every line written
    assert grep_tree(tmp_path, secret.encode()) == []
    for text in (out.out, out.err, caplog.text):
        assert secret not in text


def test_password_in_storage_under_mlflow_run_fails_that_run_and_delete_then_gc_purges_it(
        mlflow_store, data_dir, monkeypatch, capsys):
    secret = "p@ss:w/rd-Zq81"
    url = f"postgresql://u:{secret}@db.invalid/optuna"
    client = MlflowClient()
    exp_id = client.create_experiment("rockcls")
    run_id = client.create_run(exp_id).info.run_id
    client.log_param(run_id, "storage", url)  # what `mlflow run -P storage=...` does before tune starts
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp_id)
    capsys.readouterr()  # MLflow's own lines about creating the store
    assert run_command(tune.main, ["--data", str(data_dir), *TRAIN_ARGS, "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rockcls: error: storage: holds a password") and err.count("\n") == 1
    assert secret not in err and "ROCKCLS_STORAGE" in err and "~/.pgpass" in err
    run = client.get_run(run_id)
    # not deleted: `mlflow run` marks it FAILED after tune exits, and fails on a deleted run
    assert (run.info.status, run.info.lifecycle_stage) == ("FAILED", "active")
    assert f"erase it with `mlflow runs delete --run-id {run_id}` then `mlflow gc " in err
    client.delete_run(run_id)  # what `mlflow runs delete` does
    gc = err.split("`mlflow gc ", 1)[1].split("`", 1)[0]
    assert gc == f"--backend-store-uri {mlflow_store} --run-ids {run_id}"
    done = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "gc", *gc.split()], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.raises(MlflowException):
        client.get_run(run_id)


def test_devices_one_worker_per_gpu_and_cpu_workers():
    assert devices.parse_devices("cpu, cpu") == ["cpu", "cpu"]
    assert devices.parse_devices("") == []
    with pytest.raises(ConfigError, match="devices: GPU 1 listed twice"):
        devices.parse_devices("1,cuda:1")
    with pytest.raises(ConfigError, match="devices: 'gpu0' is neither a GPU id"):
        devices.parse_devices("gpu0")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="devices: GPU\\(s\\) 0 requested but CUDA is not available"):
            devices.parse_devices("0")


def test_gpu_workers_are_pinned_to_one_device_each(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    env = search_workers.worker_env("1", ["0", "1"], {"CUDA_VISIBLE_DEVICES": "4,5", "PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and env["PATH"] == "/bin" and env["MLFLOW_TRACKING_URI"]
    assert search_workers.worker_env("2", ["2"], {})["CUDA_VISIBLE_DEVICES"] == "2"
    cpu = search_workers.worker_env("cpu", ["cpu", "cpu"], {})
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["OMP_NUM_THREADS"] == "4"


class FakeTrial:
    number = 7

    def __init__(self, prune_at: int | None = None):
        self.reported, self.asked, self.prune_at = [], [], prune_at

    def report(self, value: float, step: int) -> None:
        self.reported.append(step)

    def should_prune(self) -> bool:
        self.asked.append(self.reported[-1])
        return self.reported[-1] == self.prune_at


def test_pruning_steps_keep_folds_apart_and_skip_the_last_epoch(monkeypatch):
    monkeypatch.setattr(search_trial, "find_trial_run", lambda *_: None)
    trial = FakeTrial()
    reporter = search_trial.EpochReporter(trial, folds=2, epochs=3, study_run_id="x")
    for fold in range(2):
        for epoch in range(3):
            reporter(fold, epoch, {"val_macro_f1": 0.5})
    assert trial.reported == [0, 1, 2, 3, 4, 5], "step = fold * epochs + epoch"
    assert trial.asked == [0, 1, 2, 3, 4], "never asked after the final epoch"
    pruned = search_trial.EpochReporter(FakeTrial(prune_at=3), folds=2, epochs=3, study_run_id="x")
    for epoch in range(3):
        pruned(0, epoch, {"val_macro_f1": 0.5})
    with pytest.raises(optuna.TrialPruned, match="fold 1 epoch 0: val macro-F1 0.5000"):
        pruned(1, 0, {"val_macro_f1": 0.5})


def test_wilcoxon_reporter_reports_each_fold_once_on_its_index_and_asks_only_between_folds(monkeypatch):
    trial = FoldValues()
    reporter = search_trial.FoldReporter(trial, folds=3)
    for fold, score in enumerate([0.6, 0.5, 0.8]):
        reporter(fold, score)
    assert trial.values == {0: 0.6, 1: 0.5, 2: 0.8}, "step = fold, value = the fold's OOF macro-F1"
    assert trial.asked == [0, 1], "asked between folds, never after the last"
    pruned = search_trial.FoldReporter(FakeTrial(prune_at=1), folds=3)
    pruned(0, 0.5)
    with pytest.raises(optuna.TrialPruned, match="after fold 1: OOF macro-F1 0.4000"):
        pruned(1, 0.4)

    logged = []
    monkeypatch.setattr(search_trial, "find_trial_run", lambda *_: SimpleNamespace(info=SimpleNamespace(run_id="r")))
    monkeypatch.setattr(search_trial.tracking, "log_metrics", lambda run_id, m, step: logged.append((run_id, m, step)))
    epochs = FakeTrial()
    on_epoch_end = search_trial.EpochReporter(epochs, folds=3, epochs=2, study_run_id="x", report=False)
    for fold, epoch in [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)]:  # fold 1 stopped early
        on_epoch_end(fold, epoch, {"val_macro_f1": 0.5})
    assert epochs.reported == [] and epochs.asked == [], "under wilcoxon an epoch is logged, not reported"
    assert [step for _, _, step in logged] == [0, 1, 2, 4, 5] and on_epoch_end.epochs_run == 5
    assert logged[0] == ("r", {"val_macro_f1": 0.5}, 0)


class FoldValues(FakeTrial):
    def __init__(self):
        super().__init__()
        self.values = {}

    def report(self, value: float, step: int) -> None:
        assert step not in self.values, "Wilcoxon warns about a step reported twice"
        self.values[step] = value
        super().report(value, step)


def wilcoxon_study(search_backbone: str = "") -> optuna.Study:
    """Three complete trials with per-fold scores: test_vit at about 0.9, test_efficientnet at
    about 0.4 (their best at 0.42 on every fold)."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    tune_cfg = search_space.TuneConfig(pruner="wilcoxon", search_backbone=search_backbone)
    study = optuna.create_study(direction="maximize", pruner=search_pruning.build_pruner(tune_cfg, steps=3))
    dist = {"backbone": CategoricalDistribution(["test_vit", "test_efficientnet"])}
    for label, folds in [("test_vit", (0.9, 0.88, 0.91)), ("test_efficientnet", (0.42, 0.42, 0.42)),
                         ("test_efficientnet", (0.38, 0.4, 0.36))]:
        study.add_trial(create_trial(params={"backbone": label}, distributions=dist, value=sum(folds) / 3,
                                     intermediate_values=dict(enumerate(folds))))
    return study


def run_folds(study: optuna.Study, backbone: str, folds: tuple[float, ...], search_backbone: str = "") -> TrialState:
    """One trial of ``backbone`` through the trial's hooks under wilcoxon (one epoch per fold, whose
    value is also the fold's score), told to ``study``."""
    plan = search_space.StudyPlan(build_config(TrainConfig, {"folds": 3, "epochs": 1}),
                                  search_space.TuneConfig(pruner="wilcoxon", search_backbone=search_backbone),
                                  [], "s", "")
    study.enqueue_trial({"backbone": backbone})
    trial = study.ask()
    assert trial.suggest_categorical("backbone", ["test_vit", "test_efficientnet"]) == backbone
    on_epoch_end, on_fold_end = search_trial.build_hooks(trial, plan, study_run_id="")
    on_epoch_end.run_id = ""  # no MLflow run behind this trial
    try:
        for fold, value in enumerate(folds):
            on_epoch_end(fold, 0, {"val_macro_f1": value})
            on_fold_end(fold, value)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED
    study.tell(trial, sum(folds) / len(folds))
    return TrialState.COMPLETE


def test_wilcoxon_prunes_a_clearly_worse_trial_after_two_folds_and_keeps_a_good_one():
    study = wilcoxon_study()
    assert run_folds(study, "test_vit", (0.5, 0.45, 0.5)) == TrialState.PRUNED
    pruned = study.get_trials()[-1]
    assert pruned.intermediate_values == {0: 0.5, 1: 0.45}, "stopped between fold 1 and fold 2"
    assert run_folds(study, "test_vit", (0.92, 0.9, 0.9)) == TrialState.COMPLETE
    assert run_folds(study, "test_vit", (0.89, 0.95, 0.9)) == TrialState.COMPLETE, "worse on one fold only"


def test_wilcoxon_with_a_searched_backbone_compares_with_the_best_trial_of_the_same_backbone():
    """test_efficientnet at 0.5, 0.45 is far behind the best trial (test_vit) but ahead of its own kind."""
    assert run_folds(wilcoxon_study(), "test_efficientnet", (0.5, 0.45, 0.5)) == TrialState.PRUNED
    searched = "test_vit,test_efficientnet"
    assert run_folds(wilcoxon_study(searched), "test_efficientnet", (0.5, 0.45, 0.5), searched) == TrialState.COMPLETE
    assert run_folds(wilcoxon_study(searched), "test_efficientnet", (0.3, 0.35, 0.4), searched) == TrialState.PRUNED


def test_wilcoxon_needs_a_p_threshold_its_folds_can_reach():
    search_pruning.check_pruner(search_space.TuneConfig(pruner="wilcoxon"), folds=3)
    search_pruning.check_pruner(search_space.TuneConfig(pruner="median", pruner_p=0.01), folds=1)
    with pytest.raises(ConfigError, match=r"pruner: wilcoxon .* give --folds 3 or more \(got 2\)"):
        search_pruning.check_pruner(search_space.TuneConfig(pruner="wilcoxon"), folds=2)
    with pytest.raises(ConfigError, match=r"pruner_p: with 3 folds .* smallest p-value \(every fold worse\) is 0.25"):
        search_pruning.check_pruner(search_space.TuneConfig(pruner="wilcoxon", pruner_p=0.2), folds=3)
    search_pruning.check_pruner(search_space.TuneConfig(pruner="wilcoxon", pruner_p=0.1), folds=5)
    with pytest.raises(ConfigError, match="pruner_p: must be < 1.0"):
        build_config(search_space.TuneConfig, {"pruner_p": "1"})


def test_wilcoxon_study_with_two_workers_reports_one_value_per_fold(mlflow_store, tmp_path, data_dir):
    base, fixed = search_space.build_search_config(dict(
        data=str(data_dir), backbone="test_efficientnet", pretrained=False, img_size=32, folds=3, epochs=1,
        batch_size=16, num_workers=0, hn_memory=32, warmup_epochs=0.5, tta="none"))
    tune_cfg = build_config(search_space.TuneConfig, dict(trials=2, devices="cpu,cpu", pruner="wilcoxon",
                                                       pruner_p="0.4", top_k=0))
    outcome = search_study.run_study(base, tune_cfg, fixed)
    assert outcome.worker_codes == [0, 0]
    study = load_study(f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    client = MlflowClient()
    runs = trial_runs(client, outcome.study_run_id)
    for t in trials:
        assert sorted(t.intermediate_values) == [0, 1, 2], "one value per fold, keyed by the fold index"
        assert t.user_attrs[search_bookkeeping.EPOCHS] == 3
        folds = client.search_runs([runs[t.number].info.experiment_id],
                                   f"tags.`mlflow.parentRunId` = '{runs[t.number].info.run_id}'")
        scores = {int(r.data.tags[names.FOLD]): r.data.metrics["oof_macro_f1"] for r in folds}
        assert t.intermediate_values == pytest.approx(scores), "each fold's own OOF macro-F1"
        assert runs[t.number].data.tags[names.EPOCHS_RUN] == "3"
    params = client.get_run(outcome.study_run_id).data.params
    assert (params["pruner"], params["pruner_p"]) == ("wilcoxon", "0.4")
    assert outcome.epochs_run == 6


def test_study_run_of_a_study_that_raises_ends_failed_with_its_reason_and_an_interrupted_one_killed(
        mlflow_store, tmp_path, data_dir, monkeypatch):
    """An ordinary error after the study run opened used to leave it RUNNING (only ^C ended it)."""
    base, fixed = search_space.build_search_config(dict(
        data=str(data_dir), backbone="test_efficientnet", pretrained=False, img_size=32, epochs=1, num_workers=0))
    tune_cfg = build_config(search_space.TuneConfig, dict(trials=1, top_k=0))

    def broken(plan):
        raise RuntimeError("injected: no worker could start\nsecond line")

    monkeypatch.setattr(search_study, "run_in_process", broken)
    with pytest.raises(RuntimeError, match="injected"):
        search_study.run_study(base, tune_cfg, fixed)
    client = MlflowClient()
    run_id = load_study(f"sqlite:///{tmp_path / 'optuna.db'}").user_attrs[search_tickets.ATTR_RUN]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[names.FAIL_REASON] == "injected: no worker could start"

    def interrupted(plan):
        raise KeyboardInterrupt

    monkeypatch.setattr(search_study, "run_in_process", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search_study.run_study(base, tune_cfg, fixed)  # the same study, resumed
    assert client.get_run(run_id).info.status == "KILLED"


def test_bad_tune_values_end_as_one_line_errors(mlflow_store, data_dir, capsys):
    argv = ["--data", str(data_dir), *TRAIN_ARGS]
    assert run_command(tune.main, [*argv, "--search-hn-ratio", "0:2"]) == 2
    assert capsys.readouterr().err.strip() == "rockcls: error: search_hn_ratio: must be <= 1.0, got 2.0"
    assert run_command(tune.main, [*argv, "--pruner", "random"]) == 2
    assert ("rockcls: error: pruner: must be one of median, hyperband, wilcoxon, none; got 'random'"
            in capsys.readouterr().err)
    assert run_command(tune.main, [*argv, "--pruner", "wilcoxon"]) == 2  # tune's folds default to 1
    assert capsys.readouterr().err.strip() == ("rockcls: error: pruner: wilcoxon compares per-fold scores and can "
                                               "first prune after 2 folds, before a third: give --folds 3 or more "
                                               "(got 1)")
    assert run_command(tune.main, [*argv, "--storage", "mysql://nobody@127.0.0.1:1/x"]) == 2
    assert capsys.readouterr().err.startswith("rockcls: error: storage: cannot open mysql://nobody@127.0.0.1:1/x")


def test_trials_cannot_run_their_folds_on_devices():
    with pytest.raises(ConfigError, match="devices: a train setting tune does not use"):
        search_space.build_search_config({"data": "somewhere", "devices": "cpu,cpu"})


# ---------------------------------------------------------------------------- the backbone as a searched dimension

def test_search_backbone_entries_are_parsed_and_bad_ones_named_in_one_line():
    base, fixed = search_space.build_search_config({"data": "x", "backbone": "test_efficientnet", "pretrained": False})
    tune_cfg = search_space.TuneConfig(search_backbone=" test_vit , test_efficientnet:/w/eff.pth@48")
    space = search_space.build_search_space(tune_cfg, base, fixed)
    backbone = space[0]
    assert backbone.name == "backbone" and backbone.choices == ("test_vit", "test_efficientnet:/w/eff.pth@48")
    assert search_space.train_overrides(space, {"backbone": "test_vit", "lr": 1e-3}) == {"backbone": "test_vit",
                                                                                        "lr": 1e-3}
    assert search_space.train_overrides(space, {"backbone": "test_efficientnet:/w/eff.pth@48"}) == {
        "backbone": "test_efficientnet", "pretrained_path": "/w/eff.pth", "img_size": 48}
    bad = {"test_vit": "give at least two entries A,B",
           "test_vit,,test_efficientnet": "empty entry in 'test_vit,,test_efficientnet'",
           "test_vit,test_efficientnet,test_vit": "'test_vit' is given twice",
           "test_vit,efficientnet_litex:pkg": "'efficientnet_litex:pkg': unknown timm model 'efficientnet_litex'",
           "test_vit,test_efficientnet@big": "'test_efficientnet@big': size after @ must be a whole number of "
                                             "pixels >= 16, got 'big'",
           "test_vit,test_efficientnet@8": "'test_efficientnet@8': size after @ must be",
           "test_vit,test_efficientnet:": "'test_efficientnet:': empty weights path after ':'",
           "test_vit,:eff.pth": "':eff.pth': no timm model name"}
    for spec, message in bad.items():
        with pytest.raises(ConfigError, match=r"^search_backbone: ") as err:
            search_space.build_search_space(search_space.TuneConfig(search_backbone=spec), base, fixed)
        assert message in str(err.value) and "\n" not in str(err.value), spec
    with_file, _ = search_space.build_search_config({"data": "x", "pretrained_path": "/w/vit.pth"})
    with pytest.raises(ConfigError, match="'test_efficientnet' and 'test_vit' would both load pretrained_path"):
        search_space.build_search_space(search_space.TuneConfig(search_backbone="test_vit,test_efficientnet"),
                                        with_file)


def test_auto_lr_range_spans_every_backbone_entrys_weights_and_the_baseline_trains_the_base_backbone():
    scratch, _ = search_space.build_search_config({"data": "x", "pretrained": False, "backbone": "test_efficientnet"})
    low, high = search_space.AUTO_LR_SPAN
    mixed = search_space.build_search_space(
        search_space.TuneConfig(search_backbone="test_vit,test_efficientnet:/w/eff.pth"), scratch)
    lr = {d.name: d for d in mixed}["lr"]
    pretrained_lr = AUTO_LR_PRETRAINED
    assert lr.low == pytest.approx(pretrained_lr / low) and lr.high == pytest.approx(automatic_lr(scratch) * high)
    # trial 0: the entry of the base backbone, at the automatic rate of that entry's weights
    assert search_space.baseline_params(mixed, scratch) == {
        "backbone": "test_efficientnet:/w/eff.pth", "lr": pretrained_lr, "hn_ratio": 0.0, "balanced_ratio": 0.0,
        "hn_memory": scratch.hn_memory}
    same = search_space.build_search_space(search_space.TuneConfig(search_backbone="test_vit,test_efficientnet"),
                                           scratch)
    lr = {d.name: d for d in same}["lr"]
    assert (lr.low, lr.high) == pytest.approx((automatic_lr(scratch) / low, automatic_lr(scratch) * high))
    other, _ = search_space.build_search_config({"data": "x", "pretrained": False, "backbone": "davit_base"})
    baseline = search_space.baseline_params(same, other)
    assert baseline["backbone"] == "test_vit", "base backbone not listed: the first entry"
    # the first tickets cover every backbone: the baseline's, then the others (their other params sampled)
    assert search_space.opening_params(same, baseline) == [baseline, {"backbone": "test_efficientnet"}]
    assert search_space.opening_params(same, {}) == [{"backbone": "test_vit"}, {"backbone": "test_efficientnet"}]
    assert search_space.opening_params([lr], {"lr": 1e-3}) == [{"lr": 1e-3}]


def test_study_plan_parses_its_search_space_once_and_a_replaced_plan_its_own(monkeypatch):
    parsed = []
    real = search_space.build_search_space
    monkeypatch.setattr(search_space, "build_search_space", lambda *a: parsed.append(a) or real(*a))
    plan = search_space.StudyPlan(build_config(TrainConfig, {"folds": 3}), search_space.TuneConfig(), [], "s", "")
    assert plan.space is plan.space and len(parsed) == 1
    narrower = dataclasses.replace(plan, tune=dataclasses.replace(plan.tune, search_hn_memory=""))
    assert "hn_memory" in [d.name for d in plan.space] and "hn_memory" not in [d.name for d in narrower.space]
    assert len(parsed) == 2
    assert search_space.StudyPlan.from_json(plan.to_json()) == plan, "the parsed space is not part of the plan's JSON"


def test_study_identity_holds_the_backbone_choices_not_the_replaced_backbone():
    base, fixed = search_space.build_search_config({"data": "x", "backbone": "test_efficientnet"})

    def identity(spec: str) -> dict:
        space = search_space.build_search_space(search_space.TuneConfig(search_backbone=spec), base, fixed)
        return search_space.study_identity(base, space, "fp")

    a, b = identity("test_vit,test_efficientnet"), identity("test_vit,test_efficientnet@48")
    assert "backbone" not in a["fixed"] and a["space"]["backbone"] == "test_vit,test_efficientnet"
    assert search_tickets.identity_diffs(a, b) == ["space.backbone: 'test_vit,test_efficientnet' -> "
                                                   "'test_vit,test_efficientnet@48'"]
    plain = search_space.build_search_space(search_space.TuneConfig(), base, fixed)
    assert search_space.backbone_label(base, plain) == "test_efficientnet"
    assert search_space.default_study_name(a, "test_vit+test_efficientnet").startswith("test_vit+test_efficientnet-")


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_pruner_compares_a_trial_only_with_trials_of_its_own_backbone(pruner):
    """test_vit trials score 0.9 at the first check, test_efficientnet ones 0.3-0.35. A
    test_efficientnet trial at 0.4 is behind the study but ahead of its own backbone."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    choices = ["test_vit", "test_efficientnet"]
    dist = {"backbone": CategoricalDistribution(choices)}

    def asked(search_backbone: str, backbone: str, value: float) -> bool:
        tune_cfg = search_space.TuneConfig(pruner=pruner, pruner_startup=2, pruner_warmup=0,
                                           search_backbone=search_backbone)
        # steps=1: one Hyperband bracket, so the bracket a trial lands in plays no part here
        study = optuna.create_study(direction="maximize", pruner=search_pruning.build_pruner(tune_cfg, steps=1))
        for label, score in [("test_vit", 0.9)] * 3 + [("test_efficientnet", 0.3), ("test_efficientnet", 0.35)]:
            study.add_trial(create_trial(params={"backbone": label}, distributions=dist, value=score,
                                         intermediate_values={0: score, 1: score},
                                         system_attrs={"completed_rung_0": score}))
        study.enqueue_trial({"backbone": backbone})
        trial = study.ask()
        assert trial.suggest_categorical("backbone", choices) == backbone
        trial.report(value, 1)
        return trial.should_prune()

    assert asked("", "test_efficientnet", 0.4), "without --search-backbone it is judged against every trial"
    assert not asked("test_vit,test_efficientnet", "test_efficientnet", 0.4)
    assert asked("test_vit,test_efficientnet", "test_efficientnet", 0.2), "still pruned when behind its own kind"
    assert asked("test_vit,test_efficientnet", "test_vit", 0.5)


def test_study_over_two_backbones_trains_both_and_ensembles_them(mlflow_store, data_dir, capsys):
    """4 trials over test_vit (at the fixed 32 px) and test_efficientnet pinned to 48 px; trial 0
    (baseline) is the base backbone's entry, the top-4 ensemble holds both kinds."""
    import pandas as pd

    argv = ["--data", str(data_dir), *TRAIN_ARGS, "--trials", "4", "--epochs", "2", "--search-backbone",
            "test_vit,test_efficientnet@48", "--top-k", "4", "--register", "mixed", "--study-name", "mixed"]
    assert run_command(tune.main, argv) == 0
    study = optuna.load_study(study_name="mixed", storage=f"sqlite:///{Path.cwd() / 'optuna.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert trials[0].params["backbone"] == "test_efficientnet@48" and trials[0].user_attrs[names.BASELINE]
    assert {t.params["backbone"] for t in trials} == {"test_vit", "test_efficientnet@48"}
    client = MlflowClient()
    runs = trial_runs(client, study.user_attrs[search_tickets.ATTR_RUN])
    trained = {t.number: (runs[t.number].data.params["backbone"], runs[t.number].data.params["img_size"])
               for t in trials}
    for t in trials:
        assert trained[t.number] == {"test_vit": ("test_vit", "32"),
                                     "test_efficientnet@48": ("test_efficientnet", "48")}[t.params["backbone"]]
    study_run = client.get_run(study.user_attrs[search_tickets.ATTR_RUN])
    assert study_run.data.params["search.backbone"] == "test_vit,test_efficientnet@48"
    assert study_run.data.tags[names.BACKBONE] == "test_vit+test_efficientnet"
    ensemble_run = client.get_run(study_run.data.tags[names.ENSEMBLE_RUN])
    members = ensemble_run.data.tags[names.MEMBERS].split(",")
    assert len(members) == 4 and {client.get_run(r).data.params["backbone"] for r in members} == {
        "test_vit", "test_efficientnet"}
    images = sorted(str(p) for p in Path(data_dir).rglob("*.png"))[:3]
    # the members together: one predictor over both backbones, each fed at its own resolution
    parts = [predict_lookup.load_run_predictor(r) for r in members]
    together = Predictor([m for p in parts for m in p.models], [1.0] * sum(len(p.models) for p in parts),
                         parts[0].classes)
    assert {(spec["backbone"], spec["img_size"]) for _, spec in together.models} == {("test_vit", 32),
                                                                                    ("test_efficientnet", 48)}
    assert not any(together.predict(images, tta="none", device="cpu").errors)
    # the registered ensemble: the members with a positive fitted weight
    weights = [ensemble_run.data.metrics[f"weight.{i}"] for i in range(len(members))]
    kept = {tuple(client.get_run(r).data.params[k] for k in ("backbone", "img_size"))
            for r, w in zip(members, weights) if w > 0}
    model = mlflow.pyfunc.load_model("models:/mixed@champion", model_config={"image_root": str(data_dir)})
    packed = {(spec["backbone"], str(spec["img_size"])) for _, spec in model.unwrap_python_model().predictor.models}
    assert packed == kept
    out = model.predict(pd.DataFrame({"img_path": images}), params={"tta": "none"})
    assert len(out) == 3 and (out["error"] == "").all()

    capsys.readouterr()
    other = with_arg(argv, "--search-backbone", "test_vit,test_efficientnet")
    assert run_command(tune.main, other) == 2
    assert ("(space.backbone: 'test_vit,test_efficientnet@48' -> 'test_vit,test_efficientnet')"
            in capsys.readouterr().err)


def test_the_study_ensemble_takes_the_best_trial_of_each_backbone_first_then_the_rest_by_score():
    from rockcls.search.report import ensemble_trials

    def trial(number, value, backbone=None, state=TrialState.COMPLETE, run=True):
        params = {"lr": 1e-3} if backbone is None else {"backbone": backbone, "lr": 1e-3}
        dists = {k: (optuna.distributions.CategoricalDistribution(["a", "b", "c"]) if k == "backbone"
                     else optuna.distributions.FloatDistribution(1e-4, 1e-2)) for k in params}
        t = optuna.trial.create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                                      params=params, distributions=dists,
                                      user_attrs={search_bookkeeping.RUN_ID: f"run{number}"} if run else {})
        t.number = number
        return t

    # the Lithology study's shape: the top 3 by score are one backbone
    study = [trial(0, 0.8245, "a"), trial(1, 0.8329, "b"), trial(2, 0.8276, "b"), trial(3, 0.8266, "b"),
             trial(4, 0.8223, "a"), trial(5, None, "b", state=TrialState.PRUNED), trial(6, 0.99, "c", run=False)]
    assert [t.number for t in ensemble_trials(study, 3)] == [1, 0, 2]
    assert [t.number for t in ensemble_trials(study, 1)] == [1]
    assert [t.number for t in ensemble_trials(study, 10)] == [1, 0, 2, 3, 4]  # no pruned, no run-less trial
    # more backbones than K: the best trial of the K best backbones
    three = study[:5] + [trial(7, 0.80, "c")]
    assert [t.number for t in ensemble_trials(three, 2)] == [1, 0]
    assert [t.number for t in ensemble_trials(three, 4)] == [1, 0, 7, 2]
    # no searched backbone: the plain top K
    plain = [trial(0, 0.5), trial(1, 0.7), trial(2, 0.6)]
    assert [t.number for t in ensemble_trials(plain, 2)] == [1, 2]


def test_mlproject_tune_passes_the_pruner_and_its_p_threshold_and_an_empty_one_means_the_default():
    from mlflow.projects import _project_spec

    entry = _project_spec.load_project(str(ROOT)).get_entry_point("tune")
    for given, expected in [({}, ("median", search_space.TuneConfig().pruner_p)),
                            ({"pruner": "wilcoxon", "pruner_p": "0.2"}, ("wilcoxon", 0.2))]:
        args = shlex.split(entry.compute_command({"data": "/d", **given}, storage_dir=None))[2:]
        tune_cfg = config_from_args(search_space.TuneConfig, tune.build_parser().parse_args(args))
        assert (tune_cfg.pruner, tune_cfg.pruner_p) == expected


def test_mlproject_tune_passes_search_backbone_and_an_empty_one_means_not_searched():
    from mlflow.projects import _project_spec

    entry = _project_spec.load_project(str(ROOT)).get_entry_point("tune")
    for given, expected in [({}, ""), ({"search_backbone": "test_vit,test_efficientnet@48"},
                                       "test_vit,test_efficientnet@48")]:
        command = entry.compute_command({"data": "/d", **given}, storage_dir=None)
        args = shlex.split(command)[2:]  # python search/tune.py
        ns = tune.build_parser().parse_args(args)
        assert build_config(search_space.TuneConfig, {"search_backbone": ns.search_backbone}).search_backbone == expected
