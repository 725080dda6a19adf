"""Optuna search over the sampler mixture, the hard-negative memory, the learning rate and optionally the backbone.

A study holds a fixed number of *slots* (``trials``). Each slot starts as a queued (WAITING)
trial, a ticket, created once by whoever creates the study (or raises ``trials``). Workers only
run tickets: a worker switches a ticket from WAITING to RUNNING atomically and never creates a
trial, so any number of worker processes, on any number of machines, finish exactly ``trials``
trials (Optuna's own ``MaxTrialsCallback`` overshoots by up to workers - 1). A trial that raises
is FAILED with its reason and its slot gets a fresh ticket; a trial whose worker died (no
heartbeat) is FAILED and queued again with the same parameters.

Each trial is one `rockcls.training.trainer.run_training` call: its train run (kind ``trial``) nests under
the study's MLflow run, reports validation macro-F1 on step ``fold * epochs + epoch`` (so the
pruner compares like with like; with a searched backbone, only among trials of that backbone), or
under the Wilcoxon pruner each fold's OOF macro-F1 on step ``fold``, and stops at once when pruned
(MLflow status KILLED)."""

from __future__ import annotations

import logging
from typing import Sequence

import optuna

from rockcls.core import store, tracking
from rockcls.core.config import TrainConfig
from rockcls.core.devices import parse_devices
from rockcls.data.folds import make_folds
from rockcls.data.index import content_fingerprint
from rockcls.search.pruning import check_pruner
from rockcls.search.report import (
    StudyOutcome,
    close_study_run,
    finalise_study,
    summarise,
)
from rockcls.search.space import (
    Dimension,
    StudyPlan,
    TuneConfig,
    backbone_dimension,
    backbone_label,
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
from rockcls.training.plan import load_dataset
from rockcls.training.record import log_data_input
from rockcls.training.models import check_backbone

log = logging.getLogger("rockcls")


def run_study(base: TrainConfig, tune: TuneConfig, fixed: Sequence[str] = ()) -> StudyOutcome:
    """Create or resume the study, run its workers, then summarise and ensemble it."""
    quiet_optuna()
    refuse_logged_password(tune.storage)
    warn_visible_password(tune.storage)
    devices = parse_devices(tune.devices)
    space = build_search_space(tune, base, fixed)
    check_pruner(tune, base.folds)
    check_fixed_backbone(base, space)
    index = load_dataset(base)  # bad data fails here once, not in every trial
    make_folds(index.labels, folds=base.folds, val_fraction=base.val_fraction, seed=base.split_seed)
    identity = study_identity(base, space, content_fingerprint(index))
    url = resolve_storage_url(tune.storage, store.tracking_uri())
    name = tune.study_name or default_study_name(identity, backbone_label(base, space))
    plan = StudyPlan(base, tune, sorted(fixed), name, url)
    storage = build_storage(url, heartbeat=tune.heartbeat, retries=tune.retries)
    study_run_id = open_study(plan, storage, identity)
    # An error ends the study run (KILLED or FAILED with its reason); otherwise close_study_run decides.
    with tracking.closing(study_run_id, finish=False):
        log_data_input(study_run_id, index, base.data, identity["data_fingerprint"], context="training")
        codes = launch_workers(plan, devices) if devices else [run_in_process(plan)]
        study = optuna.load_study(study_name=plan.study_name, storage=storage)
        outcome = summarise(study, plan, study_run_id)
        outcome.worker_codes = codes
        if not any(codes):
            finalise_study(study, storage, plan, outcome)
        close_study_run(study, study_run_id, target=tune.trials, failed=any(codes))
    return outcome


def check_fixed_backbone(base: TrainConfig, space: Sequence[Dimension]) -> None:
    """The fixed backbone must exist; a searched one replaces it (its entries are checked when parsed)."""
    searched = backbone_dimension(space)
    if searched is None:
        check_backbone(base.backbone)
    elif base.backbone not in {e.backbone for e in searched.entries}:
        log.info("%s: not trained; --search-backbone chooses among %s", base.backbone, searched.describe())
