"""Exactly --trials trials however many workers run: one enqueued ticket per trial, claimed by a worker (heartbeat recorded at claim), replaced when a trial fails or its worker is lost; the study run, its description and its identity."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from rockcls.core import names, secrets, tracking
from rockcls.core.config import command_flags
from rockcls.core.errors import ConfigError, RockclsError
from rockcls.search.pruning import pruner_params
from rockcls.search.space import (
    StudyPlan,
    backbone_label,
    baseline_params,
    fmt_value,
    opening_params,
)

log = logging.getLogger("rockcls")

# The study's user attributes: its MLflow run, what makes it the same study, and that its tickets are queued.
ATTR_RUN, ATTR_IDENTITY, ATTR_READY = "rockcls.study_run_id", "rockcls.identity", "rockcls.ready"

# A ticket's user attributes: the slot it fills and which attempt at that slot it is.
SLOT, ATTEMPT = "rockcls.slot", "rockcls.attempt"

# Trials that fill their slot for good, and those that keep every other ticket of their slot waiting.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HELD = (TrialState.RUNNING, *FINISHED)

# Seconds a process that lost the race to create the study waits for the winner to queue the tickets.
READY_WAIT_S = 60.0


def slot_of(trial: FrozenTrial) -> int | None:
    slot = trial.user_attrs.get(SLOT)
    return int(slot) if slot is not None else None


def top_up_tickets(study: optuna.Study, target: int, first: Sequence[dict[str, Any]] = (),
                   baseline: bool = False) -> int:
    """Queue a ticket for every slot below ``target`` that no live trial holds; slot ``i`` gets
    the fixed parameters ``first[i]`` (slot 0 is the baseline trial when ``baseline``)."""
    live = (TrialState.WAITING, *HELD)
    held = {slot_of(t) for t in study.get_trials(deepcopy=False, states=live)}
    missing = [s for s in range(target) if s not in held]
    for s in missing:
        marks = {names.BASELINE: True} if s == 0 and baseline else {}
        study.enqueue_trial(first[s] if s < len(first) else {}, user_attrs={SLOT: s, ATTEMPT: 0, **marks})
    return len(missing)


def queue_replacement(study: optuna.Study, trial: FrozenTrial, retries: int) -> None:
    """A fresh ticket for the slot of ``trial``, which raised, unless the slot used up its ``retries``."""
    slot, attempt = slot_of(trial), int(trial.user_attrs.get(ATTEMPT, 0))
    if slot is None:
        return
    if attempt >= retries:
        log.warning("slot %d: %d attempt(s) failed; left empty (re-run the command to try it again)", slot, attempt + 1)
        return
    study.enqueue_trial({}, user_attrs={SLOT: slot, ATTEMPT: attempt + 1})


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
    space = plan.space
    tags = {names.STUDY: plan.study_name, names.STORAGE: secrets.mask_url(plan.storage_url),
            names.BACKBONE: backbone_label(plan.base, space), names.DATA_FINGERPRINT: identity["data_fingerprint"]}
    run_id = tracking.start_run(experiment=plan.base.experiment, name=f"study-{plan.study_name}", kind="study",
                                tags=tags, adopt_env_run=True)
    with tracking.closing(run_id, finish=False):  # a study that fails to set up leaves no RUNNING run
        tracking.log_params(run_id, {**{f"search.{d.name}": d.describe() for d in space},
                                     **{f"fixed.{k}": v for k, v in identity["fixed"].items()},
                                     "study_name": plan.study_name, **pruner_params(plan.tune),
                                     "direction": "maximize", "objective": "cv_macro_f1"})
        tune = {**dataclasses.asdict(plan.tune), "storage": secrets.mask_url(plan.storage_url)}
        tracking.log_dict(run_id, {"identity": identity, "tune": tune}, "study.yaml")
        tracking.set_description(run_id, describe_study(plan))
        study.set_user_attr(ATTR_RUN, run_id)
        study.set_user_attr(ATTR_IDENTITY, identity)
        baseline = baseline_params(space, plan.base) if plan.tune.baseline else {}
        top_up_tickets(study, plan.tune.trials, opening_params(space, baseline), baseline=bool(baseline))
        study.set_user_attr(ATTR_READY, True)
    log.info("study %s created in %s: %d trials, searching %s", plan.study_name, secrets.mask_url(plan.storage_url),
             plan.tune.trials, ", ".join(f"{d.name} {d.describe()}" for d in space))
    return run_id


def describe_study(plan: StudyPlan, outcome: Any = None) -> str:
    """Markdown for the study run: what is searched, the result so far and the command to resume it."""
    base, space = plan.base, plan.space
    trains = backbone_label(base, space)
    what = (f"**Optuna study** `{plan.study_name}`: {plan.tune.trials} trials of training `{trains}` on "
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
                  f"({', '.join(f'{k}={fmt_value(v)}' for k, v in outcome.best_params.items())}); "
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
        tracking.set_tags(env_run, {names.KIND: "study-resume", ATTR_RUN: run_id, names.STUDY: plan.study_name})
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
