"""The end of a study: summary metrics and plots on the study run, the best trials' ensemble, registration."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from rockcls.core import names, secrets, tracking
from rockcls.core.errors import first_line
from rockcls.runs import ensemble
from rockcls.runs.registry import register_ensemble
from rockcls.search.bookkeeping import RUN_ID, epochs_run
from rockcls.search.space import BACKBONE, StudyPlan, fmt_value
from rockcls.search.tickets import FINISHED, describe_study

log = logging.getLogger("rockcls")


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
            params = ", ".join(f"{k}={fmt_value(v)}" for k, v in self.best_params.items())
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
                       epochs_run=sum(epochs_run(t) for t in finished),
                       epochs_saved=sum(plan.steps - epochs_run(t) for t in pruned))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = max(complete, key=lambda t: t.value)
        out.best_trial, out.best_value, out.best_params = best.number, best.value, dict(best.params)
        out.best_run_id = best.user_attrs.get(RUN_ID, "")
    baseline = [t.value for t in complete if t.user_attrs.get(names.BASELINE)]
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
            log.warning("plot %s skipped: %s", name, first_line(exc))
            continue
        fig = getattr(axes, "figure", None) or axes.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        tracking.log_figure(run_id, fig, f"plots/{name}.png")


def ensemble_trials(trials: list[optuna.trial.FrozenTrial], k: int) -> list[optuna.trial.FrozenTrial]:
    """The K completed trials the study ensembles, best first. With a searched backbone the best
    trial of each backbone entry comes first (best entry first), then the rest by value: K
    trials of one backbone, a seed apart in effect, err together (docs/benchmarks.md section 1),
    and on Lithology the study's top 3 were all one entry and voted lower than the best of each
    entry plus the next. Without one it is the plain top K. Only the trials' own scores decide, so
    the ensemble's cross-fitted score stays honest; its weight fit may still give a member 0."""
    ranked = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get(RUN_ID)),
                    key=lambda t: t.value, reverse=True)
    firsts, seen = [], set()
    for t in ranked:
        entry = t.params.get(BACKBONE)
        if entry is not None and entry not in seen:
            seen.add(entry)
            firsts.append(t)
    first_numbers = {t.number for t in firsts}
    rest = [t for t in ranked if t.number not in first_numbers]
    return (firsts + rest)[:k]


def ensemble_best_trials(study: optuna.Study, plan: StudyPlan, outcome: StudyOutcome) -> None:
    """Weighted soft voting of the top-K completed trials (`ensemble_trials`: the best of each
    searched backbone first), with the ensemble entry point's fit and cross-fitted score, logged
    under the study run and registered if asked."""
    chosen = ensemble_trials(study.get_trials(deepcopy=False), plan.tune.top_k)  # it keeps the completed ones
    run_ids = [t.user_attrs[RUN_ID] for t in chosen]
    members = ensemble.load_members(run_ids)
    fit = ensemble.fit_ensemble(members, bias=True, seed=plan.base.seed)
    tta = ensemble.members_tta(members)
    run_id = ensemble.log_ensemble(fit, experiment=plan.base.experiment, parent_run_id=outcome.study_run_id,
                                   params={"top_k": plan.tune.top_k, "study": plan.study_name,
                                           "register": plan.tune.register, "tta": tta},
                                   tags={names.STUDY: plan.study_name},
                                   command=f"python -m rockcls ensemble --runs {','.join(run_ids)} "
                                           f"--seed {plan.base.seed} --tta {tta}")
    with tracking.closing(run_id):
        if plan.tune.register:
            outcome.registration = register_ensemble(fit, name=plan.tune.register, run_id=run_id,
                                                     tta=tta).summary()
    outcome.ensemble_run_id, outcome.ensemble_score = run_id, fit.crossfit_score
    tracking.log_metrics(outcome.study_run_id, {"ensemble_macro_f1": fit.crossfit_score,
                                                "ensemble_insample_macro_f1": fit.insample_score},
                         step=outcome.finished)
    tracking.set_tags(outcome.study_run_id, {names.ENSEMBLE_RUN: run_id})


def close_study_run(study: optuna.Study, run_id: str, *, target: int, failed: bool) -> None:
    """End the study run unless trials still run elsewhere (other machines)."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.RUNNING for t in trials):
        return
    complete = sum(t.state in FINISHED for t in trials) >= target
    tracking.set_tags(run_id, {names.COMPLETE: str(complete and not failed).lower()})
    tracking.end_run(run_id, "FAILED" if failed else "FINISHED")
