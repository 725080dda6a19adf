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
pruner compares like with like), and stops at once when pruned (MLflow status KILLED)."""

from __future__ import annotations

from typing import Sequence

import optuna
import timm

from rockcls.core import tracking
from rockcls.core.config import (
    TrainConfig,
)
from rockcls.core.devices import parse_devices
from rockcls.core.errors import ConfigError
from rockcls.data.index import content_fingerprint, make_folds
from rockcls.search.report import (
    StudyOutcome,
    close_study_run,
    finalise_study,
    summarise,
)
from rockcls.search.space import (
    StudyPlan,
    TuneConfig,
    build_search_space,
    default_study_name,
    quiet_optuna,
    study_identity,
)
from rockcls.search.storage import (
    build_storage,
    refuse_logged_password,
    resolve_storage_url,
    warn_visible_password,
)
from rockcls.search.tickets import open_study
from rockcls.search.workers import launch_workers, run_in_process
from rockcls.training import trainer as training


def run_study(base: TrainConfig, tune: TuneConfig, fixed: Sequence[str] = ()) -> StudyOutcome:
    """Create or resume the study, run its workers, then summarise and ensemble it."""
    quiet_optuna()
    refuse_logged_password(tune.storage)
    warn_visible_password(tune.storage)
    if not timm.is_model(base.backbone):
        raise ConfigError(f"backbone: unknown timm model {base.backbone!r}")
    devices = parse_devices(tune.devices)
    space = build_search_space(tune, base, fixed)
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
