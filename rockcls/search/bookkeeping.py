"""A trial's bookkeeping and its repair: what a trial records on itself (its train run, why it failed, the epochs it trained), its MLflow run, and the runs of a trial whose worker was lost ended FAILED."""

from __future__ import annotations

import logging

import optuna
from optuna.trial import FrozenTrial

from rockcls.core import names, tracking
from rockcls.search.tickets import ATTR_RUN

log = logging.getLogger("rockcls")

# A trial's user attributes: its train run, and why it raised (named as its run's tag).
RUN_ID, REASON = "rockcls.run_id", names.FAIL_REASON

# Epochs a trial trained (user attribute): its intermediate values count folds under wilcoxon.
EPOCHS = "rockcls.epochs"


def epochs_run(trial: FrozenTrial) -> int:
    """Epochs the trial trained (studies from before the attribute: one intermediate value per epoch)."""
    return int(trial.user_attrs.get(EPOCHS, len(trial.intermediate_values)))


def find_trial_run(study_run_id: str, number: int):
    runs = [r for r in tracking.child_runs(study_run_id, kind="trial") if r.data.tags.get(names.TRIAL) == str(number)]
    return max(runs, key=lambda r: r.info.start_time) if runs else None


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
    tracking.set_tags(run.info.run_id, {names.TRIAL_STATE: "FAIL", REASON: "worker lost (no heartbeat)"})
    tracking.end_run(run.info.run_id, "FAILED")
