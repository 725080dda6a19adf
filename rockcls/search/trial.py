"""One trial: a train run under the study run, its val macro-F1 reported to the pruner after every epoch (or, under wilcoxon, each fold's OOF macro-F1 after the fold), its outcome recorded on the trial and its run."""

from __future__ import annotations

import logging
import os
import shutil
import socket

import optuna
from optuna.trial import FrozenTrial, TrialState

from rockcls.core import names, secrets, tracking
from rockcls.core.config import with_overrides
from rockcls.core.errors import RunStopped
from rockcls.search.bookkeeping import EPOCHS, REASON, RUN_ID, epochs_run, find_trial_run
from rockcls.search.pruning import reports_folds
from rockcls.search.space import StudyPlan, fmt_value, train_overrides
from rockcls.search.tickets import ATTEMPT, FINISHED, SLOT, queue_replacement
from rockcls.training.trainer import run_training

log = logging.getLogger("rockcls")


class PrunedTrial(optuna.TrialPruned, RunStopped):
    """Optuna stops the trial (it is a TrialPruned); its train and fold runs end KILLED, not FAILED."""


class EpochReporter:
    """``on_epoch_end`` hook: log val macro-F1 on the trial run on step fold * epochs + epoch and
    count the epochs trained; with ``report`` (the per-epoch pruners) also report it on that step
    and stop the trial when the pruner says so (never at the last step: Hyperband would prune a
    finished trial)."""

    def __init__(self, trial: optuna.Trial, *, folds: int, epochs: int, study_run_id: str, report: bool = True):
        self.trial, self.epochs, self.study_run_id, self.report = trial, epochs, study_run_id, report
        self.last_step = folds * epochs - 1
        self.run_id: str | None = None
        self.epochs_run = 0

    def __call__(self, fold: int, epoch: int, metrics: dict[str, float]) -> None:
        step = fold * self.epochs + epoch
        value = float(metrics["val_macro_f1"])
        self.epochs_run += 1
        self.log_epoch(step, value)
        if not self.report:
            return
        self.trial.report(value, step)
        if step < self.last_step and self.trial.should_prune():
            raise PrunedTrial(f"fold {fold} epoch {epoch}: val macro-F1 {value:.4f}")

    def log_epoch(self, step: int, value: float) -> None:
        if self.run_id is None:
            run = find_trial_run(self.study_run_id, self.trial.number)
            self.run_id = run.info.run_id if run else None
        if self.run_id:
            tracking.log_metrics(self.run_id, {"val_macro_f1": value}, step=step)


class FoldReporter:
    """``on_fold_end`` hook for the Wilcoxon pruner, which pairs per-instance scores across
    trials: each fold's OOF macro-F1 (its kept weights, with the run's TTA) is reported once, on
    step = fold index, as soon as the fold's result is saved; the trial is asked between folds,
    never after the last one."""

    def __init__(self, trial: optuna.Trial, *, folds: int):
        self.trial, self.folds = trial, folds

    def __call__(self, fold: int, score: float) -> None:
        self.trial.report(score, fold)
        if fold < self.folds - 1 and self.trial.should_prune():
            raise PrunedTrial(f"after fold {fold}: OOF macro-F1 {score:.4f}, behind the best trial's folds")


def build_hooks(trial: optuna.Trial, plan: StudyPlan, study_run_id: str) -> tuple[EpochReporter, FoldReporter | None]:
    """The trial's ``on_epoch_end`` and ``on_fold_end`` hooks: the pruner hears each fold under
    wilcoxon, each epoch otherwise; every epoch is logged on the trial run either way."""
    base, per_fold = plan.base, reports_folds(plan.tune)
    epochs = EpochReporter(trial, folds=base.folds, epochs=base.epochs, study_run_id=study_run_id, report=not per_fold)
    return epochs, FoldReporter(trial, folds=base.folds) if per_fold else None


class Objective:
    """Suggestions -> train config -> `run_training`; returns the validation macro-F1."""

    def __init__(self, plan: StudyPlan, study_run_id: str):
        self.plan, self.space, self.study_run_id = plan, plan.space, study_run_id

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr(names.WORKER, f"{socket.gethostname()}:{os.getpid()}")
        params = {d.name: d.suggest(trial) for d in self.space}
        base = self.plan.base
        on_epoch_end, on_fold_end = build_hooks(trial, self.plan, self.study_run_id)
        tags = {names.TRIAL: str(trial.number), names.STUDY: self.plan.study_name,
                SLOT: str(trial.user_attrs.get(SLOT, "")), ATTEMPT: str(trial.user_attrs.get(ATTEMPT, ""))}
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={fmt_value(v)}" for k, v in params.items()))
        try:
            cfg = with_overrides(base, **train_overrides(self.space, params))
            result = run_training(cfg, parent_run_id=self.study_run_id, kind="trial", tags=tags,
                                  on_epoch_end=on_epoch_end, on_fold_end=on_fold_end)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr(REASON, failure_reason(exc))
            raise
        finally:
            trial.set_user_attr(EPOCHS, on_epoch_end.epochs_run)
            release_memory()
        trial.set_user_attr(RUN_ID, result.run_id)
        return result.cv_macro_f1


def failure_reason(exc: BaseException, limit: int = 500) -> str:
    """``TypeName: first line`` of what the trial raised (the type alone when it said nothing);
    a storage error may quote its URL, password included."""
    name, line = type(exc).__name__, secrets.hidden_first_line(exc, limit)
    return line if line == name else f"{name}: {line}"[:limit]


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
        tags = {names.TRIAL_STATE: trial.state.name, names.EPOCHS_RUN: str(epochs_run(trial)),
                names.RUN_NAME: f"trial-{trial.number}"}
        tracking.set_tags(run_id, {**tags, **({REASON: reason} if reason else {})})
        if trial.state != TrialState.COMPLETE:
            shutil.rmtree(self.plan.base.run_dir(run_id), ignore_errors=True)
        detail = f"value {trial.value:.4f}" if trial.state == TrialState.COMPLETE else (
            reason or f"after {epochs_run(trial)} of {self.plan.steps} epochs")
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
                                    tags={names.TRIAL: str(trial.number), names.STUDY: self.plan.study_name})
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
