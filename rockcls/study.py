"""Optuna search over the sampler mixture, the hard-negative memory and the learning rate.

A study holds a fixed number of *slots* (``trials``). Each slot starts as a queued (WAITING)
trial, a ticket, created once by whoever creates the study (or raises ``trials``). Workers only
run tickets: a worker switches a ticket from WAITING to RUNNING atomically and never creates a
trial, so any number of worker processes, on any number of machines, finish exactly ``trials``
trials (Optuna's own ``MaxTrialsCallback`` overshoots by up to workers - 1). A trial that raises
is FAILED with its reason and its slot gets a fresh ticket; a trial whose worker died (no
heartbeat) is FAILED and queued again with the same parameters.

Each trial is one `rockcls.training.trainer.run_training` call: its train run (kind ``trial``) nests under
the study's MLflow run, reports validation macro-F1 on step ``fold * epochs + epoch`` (so the
pruner compares like with like), and stops at once when pruned (MLflow status KILLED).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from rockcls.core import secrets, tracking
from rockcls.core.config import (
    TrainConfig,
    build_config,
    check_value,
    coerce_value,
    command_flags,
    field_map,
    field_type,
    load_yaml,
    option,
)
from rockcls.core.errors import ConfigError, RockclsError
from rockcls.training import trainer as training

log = logging.getLogger("rockcls")

PRUNERS = ("median", "hyperband", "none")
# Train settings the search may vary: (log scale, integer).
SEARCHABLE = {"lr": (True, False), "hn_ratio": (False, False), "balanced_ratio": (False, False),
              "hn_memory": (True, True), "label_smoothing": (False, False), "augment": (False, False)}
# Settings that may differ between machines without changing what a trial computes.
MACHINE_LOCAL = ("data", "device", "num_workers", "amp", "cache", "cache_size", "cache_dir", "output_dir",
                 "resume", "config", "experiment")

ATTR_RUN, ATTR_IDENTITY, ATTR_READY = "rockcls.study_run_id", "rockcls.identity", "rockcls.ready"
SLOT, ATTEMPT, RUN_ID, REASON = "rockcls.slot", "rockcls.attempt", "rockcls.run_id", "rockcls.fail_reason"
WORKER = "rockcls.worker"
BASELINE = "rockcls.baseline"
TRIAL_TAG = "rockcls.trial"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HELD = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
READY_WAIT_S = 60.0


@dataclass
class TuneConfig:
    """Parameters of the study itself (train parameters are `TrainConfig`'s)."""

    trials: int = option(50, "finished (complete + pruned) trials the study holds in total", min=1)
    storage: str = option("", "Optuna storage (SQLAlchemy URL, best without a password: ~/.pgpass); empty = "
                            "$ROCKCLS_STORAGE, else sqlite optuna.db next to the MLflow database")
    study_name: str = option("", "study name; empty = derived from backbone, data and fixed settings")
    pruner: str = option("median", "pruner of trials that fall behind", choices=PRUNERS)
    devices: str = option("", "GPU ids, one worker process each (e.g. 0,1,2,3); 'cpu' entries add CPU workers; "
                            "empty = one worker in this process")
    timeout: float = option(0.0, "seconds after which workers start no new trial; 0 = no limit", min=0.0)
    top_k: int = option(3, "best trials ensembled at the end; 0 = no ensemble", min=0)
    register: str = option("rockcls", "registered model name of the ensemble; empty = do not register")
    search_lr: str = option("1e-5:1e-3", "lr range LOW:HIGH (log scale) or choices A,B; empty = not searched")
    search_hn_ratio: str = option("0:0.5", "hn_ratio range or choices; empty = not searched")
    search_balanced_ratio: str = option("0:1", "balanced_ratio range or choices; empty = not searched")
    search_hn_memory: str = option("64:4096", "hn_memory range (log scale) or choices such as 0,256,1024")
    search_label_smoothing: str = option("", "label_smoothing range or choices; empty = not searched")
    search_augment: str = option("", "augmentation presets to choose from, e.g. light,seed,winner")
    baseline: bool = option(True, "first trial = the train defaults of the searched parameters")
    sampler_startup: int = option(5, "random trials before the TPE sampler models the space", min=0)
    pruner_startup: int = option(3, "completed trials before the median pruner prunes", min=0)
    pruner_warmup: int = option(1, "epochs of the first fold before the median pruner prunes", min=0)
    heartbeat: int = option(30, "seconds between heartbeats of a running trial; stale (retried) after 2x", min=1)
    retries: int = option(2, "new attempts of a slot whose trial raised or whose worker died", min=0)


def quiet_optuna() -> None:
    """Heartbeats, stale-trial checks and the retry callback are 'experimental' in Optuna 5 and
    warn on every use; Optuna's per-trial INFO lines duplicate rockcls' own."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---------------------------------------------------------------------------- configuration

def build_search_config(given: dict[str, Any]) -> tuple[TrainConfig, list[str]]:
    """The train config every trial starts from, and the searchable names the user fixed.

    ``given``: train parameters from the command line (None = not given). A parameter given
    there or in the YAML ``config`` is fixed for every trial. Unlike `train`, ``folds``
    defaults to 1: one stratified holdout split shared by all trials.
    """
    given = {k: v for k, v in given.items() if v is not None}
    from_yaml = set(load_yaml(given["config"])) if given.get("config") else set()
    overrides = dict(given)
    if "folds" not in given and "folds" not in from_yaml:
        overrides["folds"] = 1
    cfg = build_config(TrainConfig, overrides)
    if cfg.resume:
        raise ConfigError("resume: not used by tune; re-run the same tune command to continue its study")
    return cfg, sorted((set(given) | from_yaml) & set(SEARCHABLE))


@dataclass(frozen=True)
class Dimension:
    """One searched train setting: a range (``low``..``high``) or ``choices``."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def contains(self, value: Any) -> bool:
        return value in self.choices if self.choices else self.low <= value <= self.high

    def describe(self) -> str:
        if self.choices:
            return ",".join(map(str, self.choices))
        return f"{self.low}:{self.high}{' (log)' if self.log else ''}"


def parse_dimension(name: str, spec: str) -> Dimension:
    """``LOW:HIGH`` or ``A,B,...`` for train setting ``name``, checked against its valid values."""
    fld = field_map(TrainConfig)[name]
    typ, meta, key = field_type(fld), dict(fld.metadata), f"search_{name}"
    log_scale, _ = SEARCHABLE[name]
    if ":" in spec and typ is not str:
        lo, hi = (coerce_value(key, part.strip(), typ) for part in spec.split(":", 1))
        if not lo < hi:
            raise ConfigError(f"{key}: expected LOW:HIGH with LOW < HIGH, got {spec!r}")
        if log_scale and lo <= 0:
            raise ConfigError(f"{key}: {name} is searched on a log scale, so LOW must be > 0 (got {spec!r}); "
                              f"list choices such as 0,256,1024 to include 0")
        for value in (lo, hi):
            check_value(key, value, meta)
        return Dimension(name, lo, hi, log=log_scale, integer=typ is int)
    choices = tuple(dict.fromkeys(coerce_value(key, c.strip(), typ) for c in spec.split(",") if c.strip()))
    if len(choices) < 2:
        raise ConfigError(f"{key}: give a range LOW:HIGH or at least two choices A,B (got {spec!r}); "
                          f"to fix {name} for all trials pass --{name.replace('_', '-')} instead")
    for value in choices:
        check_value(key, value, meta)
    return Dimension(name, choices=choices)


def build_search_space(tune: TuneConfig, fixed: Iterable[str] = ()) -> list[Dimension]:
    fixed = set(fixed)
    space = [parse_dimension(name, getattr(tune, f"search_{name}").strip()) for name in SEARCHABLE
             if getattr(tune, f"search_{name}").strip() and name not in fixed]
    if not space:
        raise ConfigError("nothing to search: every searched parameter is fixed or has an empty search_* range")
    return space


def baseline_params(space: Sequence[Dimension]) -> dict[str, Any]:
    """The train defaults of the searched settings (those inside their range): trial 0."""
    defaults = TrainConfig()
    return {d.name: getattr(defaults, d.name) for d in space if d.contains(getattr(defaults, d.name))}


def study_identity(base: TrainConfig, space: Sequence[Dimension], data_fingerprint: str) -> dict[str, Any]:
    """What makes two invocations the same study: data, fixed settings and search space."""
    searched = {d.name for d in space}
    fixed = {k: v for k, v in base.to_dict().items() if k not in MACHINE_LOCAL and k not in searched}
    return {"data_fingerprint": data_fingerprint, "fixed": fixed,
            "space": {d.name: d.describe() for d in space}}


def default_study_name(identity: dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{identity['fixed']['backbone']}-{digest}"


def parse_devices(text: str) -> list[str]:
    """``0,1`` -> one GPU worker each (no device twice); ``cpu`` entries -> CPU workers."""
    devices = []
    for token in (t.strip().lower() for t in text.split(",") if t.strip()):
        token = token.removeprefix("cuda:")
        if token != "cpu" and not token.isdigit():
            raise ConfigError(f"devices: {token!r} is neither a GPU id (0, 1, ...) nor 'cpu'")
        if token != "cpu" and token in devices:
            raise ConfigError(f"devices: GPU {token} listed twice (one worker per GPU)")
        devices.append(token)
    gpus = [d for d in devices if d != "cpu"]
    if gpus:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"devices: GPU(s) {','.join(gpus)} requested but CUDA is not available here")
        bad = [d for d in gpus if int(d) >= count]
        if bad:
            raise ConfigError(f"devices: GPU {bad[0]} does not exist (this machine shows {count})")
    return devices


@dataclass
class StudyPlan:
    """Everything a worker needs; JSON so worker processes get it from a file."""

    base: TrainConfig
    tune: TuneConfig
    fixed: list[str]
    study_name: str
    storage_url: str

    @property
    def space(self) -> list[Dimension]:
        return build_search_space(self.tune, self.fixed)

    @property
    def steps(self) -> int:
        return self.base.folds * self.base.epochs

    def to_json(self) -> str:
        return json.dumps({"base": self.base.to_dict(), "tune": dataclasses.asdict(self.tune),
                           "fixed": self.fixed, "study_name": self.study_name, "storage_url": self.storage_url})

    @classmethod
    def from_json(cls, text: str) -> "StudyPlan":
        d = json.loads(text)
        return cls(build_config(TrainConfig, d["base"]), build_config(TuneConfig, d["tune"]), d["fixed"],
                   d["study_name"], d["storage_url"])


# ---------------------------------------------------------------------------- storage

def default_storage_url(tracking_uri: str) -> str:
    """``optuna.db`` beside a SQLite MLflow database, else in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def resolve_storage_url(storage: str, tracking_uri: str) -> str:
    """The storage given, else ``$ROCKCLS_STORAGE``, else the default; its password is remembered
    so that no log line or error prints it."""
    source = "storage"
    if not storage and os.environ.get(secrets.STORAGE_ENV, "").strip():
        storage, source = os.environ[secrets.STORAGE_ENV].strip(), secrets.STORAGE_ENV
    if not storage:
        return default_storage_url(tracking_uri)
    secrets.remember(storage)
    if "://" not in storage:
        raise ConfigError(f"{source}: {secrets.mask_url(storage)!r} is not a database URL "
                          f"(e.g. sqlite:///optuna.db or postgresql://user@host/db)")
    scheme, rest = storage.split("://", 1)
    # SQLAlchemy 2.1 maps postgresql:// to psycopg 3; psycopg2-binary is what rockcls installs.
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg2://{rest}"
    return storage


def refuse_logged_password(storage: str) -> None:
    """Under ``mlflow run`` (MLFLOW_RUN_ID set), a password in ``-P storage`` is already in the
    tracking store: MLflow logged it as a parameter of the run this study would adopt, and
    parameters cannot be edited. Fail and soft-delete that run, and say how to purge it."""
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if not env_run or not secrets.url_secrets(storage):
        return
    tracking.end_run(env_run, "FAILED")
    tracking.delete_run(env_run)
    raise ConfigError(f"storage: holds a password, which `mlflow run` logs as a parameter of run {env_run}; that run "
                      f"is now FAILED and deleted, purge it for good with `{tracking.gc_command(env_run)}`, then give "
                      f"the URL in ${secrets.STORAGE_ENV} or the password in ~/.pgpass (-P storage=postgresql://user@host/db)")


def warn_visible_password(storage: str) -> None:
    if secrets.url_secrets(storage):
        log.warning("storage: a password on the command line is visible to other users of this machine (ps); "
                    "prefer $%s or ~/.pgpass", secrets.STORAGE_ENV)


def build_storage(url: str, *, heartbeat: int, retries: int, attempts: int = 5) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats, so a trial whose worker died is failed and queued again.

    Processes opening a fresh database at once race on creating Optuna's tables (one gets an
    IntegrityError on ``alembic_version``): the loser retries and finds them made.
    """
    from sqlalchemy.exc import SQLAlchemyError

    secrets.remember(url)  # worker processes get the URL from the plan, not from resolve_storage_url
    sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": 300}} if sqlite else {"pool_pre_ping": True}
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                                     heartbeat_stale_trial_callback=StaleTrialHandler(retries))
            break
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            if attempt == attempts - 1:
                raise ConfigError(f"storage: cannot open {secrets.mask_url(url)}: {_first_line(exc)}") from None
            time.sleep(0.5 * (attempt + 1))
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"storage: cannot open {secrets.mask_url(url)}: {_first_line(exc)}") from None
    if storage.engine.dialect.name == "sqlite":
        serialize_sqlite_transactions(storage.engine)
    return storage


def _first_line(exc: BaseException) -> str:
    # SQLAlchemy renders the URL into some messages: password included.
    return secrets.hide(str(exc).splitlines()[0][:200]) if str(exc) else type(exc).__name__


def serialize_sqlite_transactions(engine) -> None:
    """Make Optuna's WAITING -> RUNNING switch atomic on SQLite.

    pysqlite starts a transaction only at the first write, so the read-check-update in
    ``set_trial_state_values`` races between processes (measured here: 3 processes took 21 of
    300 queued trials twice). ``BEGIN IMMEDIATE`` takes the write lock before the read.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _driver_leaves_transactions_to_us(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed


# ---------------------------------------------------------------------------- the study

def slot_of(trial: FrozenTrial) -> int | None:
    slot = trial.user_attrs.get(SLOT)
    return int(slot) if slot is not None else None


def top_up_tickets(study: optuna.Study, target: int, first_params: dict[str, Any] | None = None) -> int:
    """Queue a ticket for every slot below ``target`` that no live trial holds."""
    live = (TrialState.WAITING, *HELD)
    held = {slot_of(t) for t in study.get_trials(deepcopy=False, states=live)}
    missing = [s for s in range(target) if s not in held]
    for s in missing:
        if s == 0 and first_params:
            study.enqueue_trial(first_params, user_attrs={SLOT: s, ATTEMPT: 0, BASELINE: True})
        else:
            study.enqueue_trial({}, user_attrs={SLOT: s, ATTEMPT: 0})
    return len(missing)


def open_study(plan: StudyPlan, storage: optuna.storages.RDBStorage, identity: dict[str, Any]) -> str:
    """Create the study (tickets, MLflow study run) or join it; returns the study run id.

    ``create_study`` fails for all but one of several processes starting at once; the others
    wait until the winner has queued the tickets.
    """
    try:
        study = optuna.create_study(study_name=plan.study_name, storage=storage, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=plan.study_name, storage=storage)
        if wait_until_ready(study):
            return join_study(study, plan, identity)
        log.warning("study %s exists but was never set up; setting it up now", plan.study_name)
    return set_up_study(study, plan, identity)


def wait_until_ready(study: optuna.Study, wait_s: float = READY_WAIT_S) -> bool:
    deadline = time.monotonic() + wait_s
    while not study.user_attrs.get(ATTR_READY):
        if study.get_trials(deepcopy=False) and ATTR_RUN not in study.user_attrs:
            raise RockclsError(f"study {study.study_name!r} was not created by rockcls (it has trials but no "
                               f"{ATTR_RUN} attribute): choose another --study-name")
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


def set_up_study(study: optuna.Study, plan: StudyPlan, identity: dict[str, Any]) -> str:
    tags = {"rockcls.study": plan.study_name, "rockcls.storage": secrets.mask_url(plan.storage_url),
            "rockcls.backbone": plan.base.backbone, "rockcls.data_fingerprint": identity["data_fingerprint"]}
    run_id = tracking.start_run(experiment=plan.base.experiment, name=f"study-{plan.study_name}", kind="study",
                                tags=tags, adopt_env_run=True)
    space = plan.space
    tracking.log_params(run_id, {**{f"search.{d.name}": d.describe() for d in space},
                                 **{f"fixed.{k}": v for k, v in identity["fixed"].items()},
                                 "study_name": plan.study_name, "pruner": plan.tune.pruner,
                                 "direction": "maximize", "objective": "cv_macro_f1"})
    tune = {**dataclasses.asdict(plan.tune), "storage": secrets.mask_url(plan.storage_url)}
    tracking.log_dict(run_id, {"identity": identity, "tune": tune}, "study.yaml")
    tracking.set_description(run_id, describe_study(plan))
    study.set_user_attr(ATTR_RUN, run_id)
    study.set_user_attr(ATTR_IDENTITY, identity)
    top_up_tickets(study, plan.tune.trials, baseline_params(space) if plan.tune.baseline else None)
    study.set_user_attr(ATTR_READY, True)
    log.info("study %s created in %s: %d trials, searching %s", plan.study_name, secrets.mask_url(plan.storage_url),
             plan.tune.trials, ", ".join(f"{d.name} {d.describe()}" for d in space))
    return run_id


def describe_study(plan: StudyPlan, outcome: "StudyOutcome | None" = None) -> str:
    """Markdown for the study run: what is searched, the result so far and the command to resume it."""
    base, space = plan.base, plan.space
    what = (f"**Optuna study** `{plan.study_name}`: {plan.tune.trials} trials of training `{base.backbone}` on "
            f"`{base.data}`, searching {', '.join(f'{d.name} {d.describe()}' for d in space)}; pruner "
            f"{plan.tune.pruner}. Children: one trial run per trial and the ensemble of the best "
            f"{plan.tune.top_k}; `best_macro_f1` is the best trial so far (step: finished trials).")
    tune = dataclasses.replace(plan.tune, storage=secrets.mask_url(plan.storage_url), study_name=plan.study_name)
    train = dataclasses.replace(base, data=str(Path(base.data).resolve()))
    flags = [*command_flags(tune), *command_flags(train, skip=("resume", "config"))]
    command = " ".join(["python search/tune.py", *flags])
    result = ""
    if outcome is not None and outcome.best_trial is not None:
        result = (f"\n\n**Best trial {outcome.best_trial}: macro-F1 {outcome.best_value:.4f}** "
                  f"({', '.join(f'{k}={_fmt(v)}' for k, v in outcome.best_params.items())}); "
                  f"{outcome.finished} of {plan.tune.trials} trials finished.")
        if outcome.baseline_value is not None:
            result += f" Baseline (train defaults): {outcome.baseline_value:.4f}."
    return f"{what}{result}\n\nRe-run to resume or extend it (same study):\n\n```\n{command}\n```"


def join_study(study: optuna.Study, plan: StudyPlan, identity: dict[str, Any]) -> str:
    diffs = identity_diffs(study.user_attrs.get(ATTR_IDENTITY, {}), identity)
    if diffs:
        raise ConfigError(f"study {plan.study_name!r} was created with other settings ({'; '.join(diffs[:4])}): "
                          f"use the original settings or another --study-name")
    run_id = study.user_attrs[ATTR_RUN]
    added = top_up_tickets(study, plan.tune.trials)
    tracking.reopen_run(run_id)
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if env_run and env_run != run_id:  # `mlflow run` made a run of its own: point it at the study run
        tracking.set_tags(env_run, {tracking.KIND: "study-resume", ATTR_RUN: run_id, "rockcls.study": plan.study_name})
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    log.info("study %s resumed: %d of %d trials finished%s", plan.study_name, done, plan.tune.trials,
             f", {added} slot(s) queued" if added else "")
    return run_id


def identity_diffs(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: stored -> current`` for every setting that differs between two study identities."""
    def flat(identity: dict[str, Any]) -> dict[str, Any]:
        out = {"data_fingerprint": identity.get("data_fingerprint")}
        for part in ("fixed", "space"):
            out.update({f"{part}.{k}": v for k, v in identity.get(part, {}).items()})
        return out

    a, b = flat(stored), flat(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class NoTicketLeft(Exception):
    """Every slot is finished or running elsewhere: the worker is done."""


class TicketStudy(optuna.Study):
    """A Study whose ``ask`` only starts queued tickets and never creates a trial.

    While other workers still run trials it waits (checking for stale ones), because a trial
    that fails there puts a ticket back in the queue.
    """

    def __init__(self, *, study_name: str, storage: optuna.storages.RDBStorage, sampler, pruner,
                 target: int, deadline: float | None = None, poll_s: float = 2.0):
        super().__init__(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        self.rdb, self.target, self.deadline, self.poll_s = storage, target, deadline, poll_s
        self.study_id = storage.get_study_id_from_name(study_name)

    def ask(self, fixed_distributions=None) -> optuna.Trial:
        if fixed_distributions:
            raise ValueError("TicketStudy.ask takes no fixed distributions")
        while True:
            trials = self.get_trials(deepcopy=False)
            ticket = next_ticket(trials, self.target)
            if ticket is not None:
                trial_id = self.rdb.get_trial_id_from_study_id_trial_number(self.study_id, ticket.number)
                if self._claim(trial_id):
                    return optuna.Trial(self, trial_id)
                continue
            running = any(t.state == TrialState.RUNNING for t in trials)
            if not running or (self.deadline is not None and time.monotonic() > self.deadline):
                raise NoTicketLeft
            optuna.storages.fail_stale_trials(self)
            time.sleep(self.poll_s)

    def _claim(self, trial_id: int) -> bool:
        """WAITING -> RUNNING; False when another worker was first.

        The heartbeat is recorded first: a RUNNING trial without one is never found stale, so a
        worker dying between the claim and Optuna's first heartbeat would hold its slot for good.
        A heartbeat on a WAITING trial is ignored by the stale check, and on a trial another
        worker claimed first it only refreshes that worker's own.
        """
        self.rdb.record_heartbeat(trial_id)
        try:
            return self.rdb.set_trial_state_values(trial_id, state=TrialState.RUNNING)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False


def next_ticket(trials: Sequence[FrozenTrial], target: int) -> FrozenTrial | None:
    """The oldest ticket of a slot below ``target`` that no running or finished trial holds."""
    held = {slot_of(t) for t in trials if t.state in HELD}
    for t in sorted((t for t in trials if t.state == TrialState.WAITING), key=lambda t: t.number):
        slot = slot_of(t)
        if slot is not None and slot < target and slot not in held:
            return t
    return None


def build_sampler(plan: StudyPlan, worker: int, seen: int) -> optuna.samplers.BaseSampler:
    # Seeded per worker and per resume, so workers and re-runs do not replay the same draws.
    seed = (plan.base.seed * 1_000_003 + worker * 7919 + seen) % 2**31
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=plan.tune.sampler_startup)


def build_pruner(tune: TuneConfig, steps: int) -> optuna.pruners.BasePruner:
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.pruner_startup, n_warmup_steps=tune.pruner_warmup)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(steps, 1), reduction_factor=3)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------- one trial

def find_trial_run(study_run_id: str, number: int):
    runs = [r for r in tracking.child_runs(study_run_id, kind="trial") if r.data.tags.get(TRIAL_TAG) == str(number)]
    return max(runs, key=lambda r: r.info.start_time) if runs else None


class EpochReporter:
    """``on_epoch_end`` hook: report val macro-F1 on step fold * epochs + epoch, log it on the
    trial run, and stop the trial when the pruner says so (never at the last step: Hyperband
    would prune a finished trial)."""

    def __init__(self, trial: optuna.Trial, *, folds: int, epochs: int, study_run_id: str):
        self.trial, self.epochs, self.study_run_id = trial, epochs, study_run_id
        self.last_step = folds * epochs - 1
        self.run_id: str | None = None

    def __call__(self, fold: int, epoch: int, metrics: dict[str, float]) -> None:
        step = fold * self.epochs + epoch
        value = float(metrics["val_macro_f1"])
        self.trial.report(value, step)
        if self.run_id is None:
            run = find_trial_run(self.study_run_id, self.trial.number)
            self.run_id = run.info.run_id if run else None
        if self.run_id:
            tracking.log_metrics(self.run_id, {"val_macro_f1": value}, step=step)
        if step < self.last_step and self.trial.should_prune():
            raise optuna.TrialPruned(f"fold {fold} epoch {epoch}: val macro-F1 {value:.4f}")


class Objective:
    """Suggestions -> train config -> `run_training`; returns the validation macro-F1."""

    def __init__(self, plan: StudyPlan, study_run_id: str):
        self.plan, self.space, self.study_run_id = plan, plan.space, study_run_id

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER, f"{socket.gethostname()}:{os.getpid()}")
        params = {d.name: d.suggest(trial) for d in self.space}
        base = self.plan.base
        reporter = EpochReporter(trial, folds=base.folds, epochs=base.epochs, study_run_id=self.study_run_id)
        tags = {TRIAL_TAG: str(trial.number), "rockcls.study": self.plan.study_name,
                SLOT: str(trial.user_attrs.get(SLOT, "")), ATTEMPT: str(trial.user_attrs.get(ATTEMPT, ""))}
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()))
        try:
            cfg = training.with_overrides(base, **params)
            result = training.run_training(cfg, parent_run_id=self.study_run_id, kind="trial", tags=tags,
                                           on_epoch_end=reporter)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr(REASON, failure_reason(exc))
            raise
        finally:
            release_memory()
        trial.set_user_attr(RUN_ID, result.run_id)
        return result.cv_macro_f1


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def failure_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def release_memory() -> None:
    """A failed or pruned trial may leave its tensors behind (an out-of-memory error holds frames)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TrialRecorder:
    """After each trial: its state (and failure reason) on the trial run, drop the local files of
    an unfinished trial, and a fresh ticket for the slot of a trial that raised."""

    def __init__(self, plan: StudyPlan, study_run_id: str):
        self.plan, self.study_run_id = plan, study_run_id

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = self.trial_run(trial)
        reason = trial.user_attrs.get(REASON, "")
        tags = {"rockcls.trial_state": trial.state.name, "rockcls.epochs_run": str(len(trial.intermediate_values)),
                "mlflow.runName": f"trial-{trial.number}"}
        tracking.set_tags(run_id, {**tags, **({REASON: reason} if reason else {})})
        if trial.state != TrialState.COMPLETE:
            shutil.rmtree(training.run_dir(self.plan.base, run_id), ignore_errors=True)
        detail = f"value {trial.value:.4f}" if trial.state == TrialState.COMPLETE else (
            reason or f"after {len(trial.intermediate_values)} of {self.plan.steps} epochs")
        log.info("trial %d %s (%s), run %s", trial.number, trial.state.name, detail, run_id)
        log_progress(study, self.study_run_id)
        if trial.state == TrialState.FAIL:
            queue_replacement(study, trial, self.plan.tune.retries)

    def trial_run(self, trial: FrozenTrial) -> str:
        """The trial's MLflow run; one is made (FAILED) if the trial failed before training began."""
        run = find_trial_run(self.study_run_id, trial.number)
        if run is not None:
            return run.info.run_id
        run_id = tracking.start_run(experiment=self.plan.base.experiment, name=f"trial-{trial.number}", kind="trial",
                                    parent_run_id=self.study_run_id,
                                    tags={TRIAL_TAG: str(trial.number), "rockcls.study": self.plan.study_name})
        tracking.log_params(run_id, trial.params)
        tracking.end_run(run_id, "FAILED")
        return run_id


def log_progress(study: optuna.Study, study_run_id: str) -> None:
    """The study run's curves, one point per finished trial: the best value so far and the counts."""
    trials = study.get_trials(deepcopy=False)
    complete = [t.value for t in trials if t.state == TrialState.COMPLETE]
    step = sum(t.state in FINISHED for t in trials)
    metrics = {"trials_complete": len(complete), "trials_pruned": sum(t.state == TrialState.PRUNED for t in trials),
               "trials_failed": sum(t.state == TrialState.FAIL for t in trials)}
    if complete:
        metrics["best_macro_f1"] = max(complete)
    tracking.log_metrics(study_run_id, metrics, step=step)


def queue_replacement(study: optuna.Study, trial: FrozenTrial, retries: int) -> None:
    slot, attempt = slot_of(trial), int(trial.user_attrs.get(ATTEMPT, 0))
    if slot is None:
        return
    if attempt >= retries:
        log.warning("slot %d: %d attempt(s) failed; left empty (re-run the command to try it again)", slot, attempt + 1)
        return
    study.enqueue_trial({}, user_attrs={SLOT: slot, ATTEMPT: attempt + 1})


class StaleTrialHandler:
    """Storage callback for a RUNNING trial whose worker stopped sending heartbeats (killed,
    machine lost): close its MLflow runs as FAILED, then queue it again with the same params."""

    def __init__(self, retries: int):
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retries)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        log.warning("trial %d: its worker stopped sending heartbeats; marked FAIL and queued again", trial.number)
        study_run_id = study.user_attrs.get(ATTR_RUN)
        if study_run_id:
            close_lost_trial(study_run_id, trial.number)
        self.retry(study, trial)


def close_lost_trial(study_run_id: str, number: int) -> None:
    run = find_trial_run(study_run_id, number)
    if run is None:
        return
    for fold in tracking.child_runs(run.info.run_id, kind="fold"):
        if fold.info.status == "RUNNING":
            tracking.end_run(fold.info.run_id, "FAILED")
    tracking.set_tags(run.info.run_id, {"rockcls.trial_state": "FAIL", REASON: "worker lost (no heartbeat)"})
    tracking.end_run(run.info.run_id, "FAILED")


# ---------------------------------------------------------------------------- workers

def run_worker(plan: StudyPlan, worker: int = 0, device: str | None = None) -> None:
    """Run tickets of the study until none is left (or the timeout passes)."""
    quiet_optuna()
    if device:
        plan = dataclasses.replace(plan, base=training.with_overrides(plan.base, device=device))
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
            cmd = [sys.executable, "-m", "rockcls.study", "--plan", str(spec), "--worker", str(i),
                   "--device", "cpu" if dev == "cpu" else "cuda"]
            procs.append(subprocess.Popen(cmd, env=worker_env(dev, devices, os.environ)))
            log.info("worker %d: pid %d on %s", i, procs[-1].pid, "cpu" if dev == "cpu" else f"GPU {dev}")
        try:
            return [p.wait() for p in procs]
        except KeyboardInterrupt:
            stop_workers(procs)
            raise


def worker_env(device: str, devices: Sequence[str], parent: Mapping[str, str]) -> dict[str, str]:
    """The environment of the worker on ``device``: pinned to its GPU (ids count within the
    parent's CUDA_VISIBLE_DEVICES), or a CPU worker with its share of the cores."""
    env = {**parent, "MLFLOW_TRACKING_URI": tracking.tracking_uri()}
    if device == "cpu":
        threads = str(max(1, (os.cpu_count() or 1) // max(1, sum(d == "cpu" for d in devices))))
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        return env
    visible = [v.strip() for v in parent.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    env["CUDA_VISIBLE_DEVICES"] = visible[int(device)] if visible else device
    return env


def stop_workers(procs: Sequence[subprocess.Popen], grace_s: float = 60.0) -> None:
    """SIGINT ends a worker's trial as KILLED; processes still alive after ``grace_s`` are killed."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---------------------------------------------------------------------------- the end of a study

@dataclass
class StudyOutcome:
    study_name: str
    storage: str
    study_run_id: str
    target: int
    counts: dict[str, int]
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_run_id: str = ""
    baseline_value: float | None = None
    epochs_run: int = 0
    epochs_saved: int = 0
    finalised: bool = False
    ensemble_run_id: str = ""
    ensemble_score: float | None = None
    registration: str = ""
    worker_codes: list[int] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return self.counts.get("COMPLETE", 0) + self.counts.get("PRUNED", 0)

    def summary(self) -> str:
        counts = ", ".join(f"{v} {k.lower()}" for k, v in self.counts.items() if v)
        lines = [f"study {self.study_name} ({self.storage}): {self.finished}/{self.target} trials finished "
                 f"({counts or 'none'}); study run {self.study_run_id}",
                 f"pruning saved {self.epochs_saved} of {self.epochs_run + self.epochs_saved} epochs"]
        if self.best_trial is not None:
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in self.best_params.items())
            lines.append(f"best trial {self.best_trial}: macro-F1 {self.best_value:.4f} ({params}), run {self.best_run_id}")
        if self.baseline_value is not None:
            lines.append(f"baseline (train defaults of the searched parameters): macro-F1 {self.baseline_value:.4f}")
        if self.ensemble_run_id:
            lines.append(f"ensemble run {self.ensemble_run_id}: cross-fitted macro-F1 {self.ensemble_score:.4f}")
        if self.registration:
            lines.append(self.registration)
        if any(self.worker_codes):
            lines.append(f"worker exit codes {self.worker_codes}: re-run the same command to continue")
        return "\n".join(lines)


def summarise(study: optuna.Study, plan: StudyPlan, study_run_id: str) -> StudyOutcome:
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    finished = [t for t in trials if t.state in FINISHED]
    pruned = [t for t in finished if t.state == TrialState.PRUNED]
    out = StudyOutcome(plan.study_name, secrets.mask_url(plan.storage_url), study_run_id, plan.tune.trials, counts,
                       epochs_run=sum(len(t.intermediate_values) for t in finished),
                       epochs_saved=sum(plan.steps - len(t.intermediate_values) for t in pruned))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = max(complete, key=lambda t: t.value)
        out.best_trial, out.best_value, out.best_params = best.number, best.value, dict(best.params)
        out.best_run_id = best.user_attrs.get(RUN_ID, "")
    baseline = [t.value for t in complete if t.user_attrs.get(BASELINE)]
    out.baseline_value = baseline[0] if baseline else None
    return out


def finalise_study(study: optuna.Study, storage, plan: StudyPlan, outcome: StudyOutcome) -> None:
    """Log the summary, plots and the top-K ensemble once per number of finished trials.

    Several tune processes (machines) end together; creating a marker study is atomic in the
    storage, so exactly one of them finalises.
    """
    if outcome.best_trial is None:
        log.warning("study %s: no completed trial; nothing to summarise", plan.study_name)
        return
    marker = f"{plan.study_name}.finalised-{outcome.finished}"
    try:
        optuna.create_study(study_name=marker, storage=storage)
    except optuna.exceptions.DuplicatedStudyError:
        log.info("study %s with %d finished trials was already finalised", plan.study_name, outcome.finished)
        return
    try:
        log_study_summary(study, plan, outcome)
        if plan.tune.top_k > 0:
            ensemble_best_trials(study, plan, outcome)
    except BaseException:
        optuna.delete_study(study_name=marker, storage=storage)
        raise
    outcome.finalised = True


def log_study_summary(study: optuna.Study, plan: StudyPlan, outcome: StudyOutcome) -> None:
    run_id, step = outcome.study_run_id, outcome.finished
    finished = max(outcome.finished, 1)
    metrics = {"best_macro_f1": outcome.best_value, "trials_complete": outcome.counts["COMPLETE"],
               "trials_pruned": outcome.counts["PRUNED"], "trials_failed": outcome.counts["FAIL"],
               "pruned_share": outcome.counts["PRUNED"] / finished, "epochs_run": outcome.epochs_run,
               "epochs_saved": outcome.epochs_saved}
    if outcome.baseline_value is not None:
        metrics["baseline_macro_f1"] = outcome.baseline_value
    tracking.log_metrics(run_id, metrics, step=step)
    tracking.log_dict(run_id, {"trial": outcome.best_trial, "macro_f1": outcome.best_value,
                               "params": outcome.best_params, "run_id": outcome.best_run_id}, "best_params.json")
    tracking.set_tags(run_id, {"rockcls.best_trial": str(outcome.best_trial), "rockcls.best_run_id": outcome.best_run_id,
                               "rockcls.trials_finished": str(outcome.finished)})
    tracking.log_text(run_id, study.trials_dataframe().to_csv(index=False), "trials.csv")
    tracking.set_description(run_id, describe_study(plan, outcome))
    log_study_plots(study, run_id)


def log_study_plots(study: optuna.Study, run_id: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as optuna_plots

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = {"optimization_history": optuna_plots.plot_optimization_history,
             "intermediate_values": optuna_plots.plot_intermediate_values}
    # fANOVA importances need two completed trials that differ in some parameter.
    if len(complete) >= 2 and len({json.dumps(t.params, sort_keys=True) for t in complete}) >= 2:
        plots["param_importances"] = optuna_plots.plot_param_importances
    else:
        log.info("parameter importances skipped: fewer than 2 completed trials with different parameters")
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():  # e.g. "importances will be equal" when all values tie
                warnings.simplefilter("ignore")
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.warning("plot %s skipped: %s", name, str(exc).splitlines()[0][:200])
            continue
        fig = getattr(axes, "figure", None) or axes.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        tracking.log_figure(run_id, fig, f"plots/{name}.png")


def ensemble_best_trials(study: optuna.Study, plan: StudyPlan, outcome: StudyOutcome) -> None:
    """Weighted soft voting of the top-K completed trials (the ensemble entry point's fit, with
    its cross-fitted score), logged under the study run and registered if asked."""
    from rockcls.runs import ensemble

    ranked = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.value,
                    reverse=True)
    run_ids = [t.user_attrs[RUN_ID] for t in ranked if t.user_attrs.get(RUN_ID)][:plan.tune.top_k]
    members = ensemble.load_members(run_ids)
    fit = ensemble.fit_ensemble(members, bias=True, seed=plan.base.seed)
    tta = ensemble.members_tta(members)
    run_id = ensemble.log_ensemble(fit, experiment=plan.base.experiment, parent_run_id=outcome.study_run_id,
                                   params={"top_k": plan.tune.top_k, "study": plan.study_name,
                                           "register": plan.tune.register, "tta": tta},
                                   tags={"rockcls.study": plan.study_name},
                                   command=f"python -m rockcls ensemble --runs {','.join(run_ids)} "
                                           f"--seed {plan.base.seed} --tta {tta}")
    try:
        if plan.tune.register:
            from rockcls.runs.registry import register_ensemble

            outcome.registration = register_ensemble(fit, name=plan.tune.register, run_id=run_id,
                                                           tta=tta).summary()
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id, "FINISHED")
    outcome.ensemble_run_id, outcome.ensemble_score = run_id, fit.crossfit_score
    tracking.log_metrics(outcome.study_run_id, {"ensemble_macro_f1": fit.crossfit_score,
                                                "ensemble_insample_macro_f1": fit.insample_score},
                         step=outcome.finished)
    tracking.set_tags(outcome.study_run_id, {"rockcls.ensemble_run": run_id})


# ---------------------------------------------------------------------------- the whole study

def run_study(base: TrainConfig, tune: TuneConfig, fixed: Sequence[str] = ()) -> StudyOutcome:
    """Create or resume the study, run its workers, then summarise and ensemble it."""
    import timm

    from rockcls.data.index import content_fingerprint, make_folds

    quiet_optuna()
    refuse_logged_password(tune.storage)
    warn_visible_password(tune.storage)
    if not timm.is_model(base.backbone):
        raise ConfigError(f"backbone: unknown timm model {base.backbone!r}")
    devices = parse_devices(tune.devices)
    space = build_search_space(tune, fixed)
    index = training.load_dataset(base)  # bad data fails here once, not in every trial
    make_folds(index.labels, folds=base.folds, val_fraction=base.val_fraction, seed=base.split_seed)
    identity = study_identity(base, space, content_fingerprint(index))
    url = resolve_storage_url(tune.storage, tracking.tracking_uri())
    plan = StudyPlan(base, tune, sorted(fixed), tune.study_name or default_study_name(identity), url)
    storage = build_storage(url, heartbeat=tune.heartbeat, retries=tune.retries)
    study_run_id = open_study(plan, storage, identity)
    training.log_data_input(study_run_id, index, base.data, identity["data_fingerprint"], context="training")
    try:
        codes = launch_workers(plan, devices) if devices else [run_in_process(plan)]
    except KeyboardInterrupt:
        tracking.end_run(study_run_id, "KILLED")
        raise
    study = optuna.load_study(study_name=plan.study_name, storage=storage)
    outcome = summarise(study, plan, study_run_id)
    outcome.worker_codes = codes
    if not any(codes):
        finalise_study(study, storage, plan, outcome)
    close_study_run(study, study_run_id, target=tune.trials, failed=any(codes))
    return outcome


def run_in_process(plan: StudyPlan) -> int:
    run_worker(plan, 0)
    return 0


def close_study_run(study: optuna.Study, run_id: str, *, target: int, failed: bool) -> None:
    """End the study run unless trials still run elsewhere (other machines)."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.RUNNING for t in trials):
        return
    complete = sum(t.state in FINISHED for t in trials) >= target
    tracking.set_tags(run_id, {"rockcls.complete": str(complete and not failed).lower()})
    tracking.end_run(run_id, "FAILED" if failed else "FINISHED")


# ---------------------------------------------------------------------------- worker processes

def build_worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rockcls.study",
                                     description="one worker of a rockcls study (started by search/tune.py)")
    parser.add_argument("--plan", required=True, help="JSON plan written by the tune process")
    parser.add_argument("--worker", type=int, default=0, help="worker index (seeds the sampler)")
    parser.add_argument("--device", default="", help="train device of this worker (cpu, cuda)")
    return parser


def worker_main(argv: list[str] | None = None) -> int:
    args = build_worker_parser().parse_args(argv)
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
