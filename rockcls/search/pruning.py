"""The study's pruner: the one --pruner names, whether its settings can ever prune, and pruning
within groups: a trial is compared only with the trials that share its value of one searched
parameter (the backbone), because a wide backbone's first epoch is not a narrow one's."""

from __future__ import annotations

from typing import Any, Container

import optuna
from optuna.trial import FrozenTrial, TrialState

from rockcls.core.errors import ConfigError
from rockcls.search.space import BACKBONE, TuneConfig

# Wilcoxon's per-fold test needs two finished folds before it can act and never acts after the last.
WILCOXON_MIN_FOLDS = 3


def build_pruner(tune: TuneConfig, steps: int) -> optuna.pruners.BasePruner:
    """The --pruner; with a searched backbone it compares each trial only with trials of its backbone."""
    pruner = build_base_pruner(tune, steps)
    return SameParamPruner(pruner, BACKBONE) if tune.search_backbone.strip() else pruner


def build_base_pruner(tune: TuneConfig, steps: int) -> optuna.pruners.BasePruner:
    """``steps``: the epochs of a trial (median, hyperband report each epoch; wilcoxon each fold)."""
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.pruner_startup, n_warmup_steps=tune.pruner_warmup)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(steps, 1), reduction_factor=3)
    if tune.pruner == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=tune.pruner_p, n_startup_steps=2)
    return optuna.pruners.NopPruner()


def check_pruner(tune: TuneConfig, folds: int) -> None:
    """Wilcoxon pairs the trial's fold scores with the best trial's; it can prune before fold j+1
    (j >= 2 finished folds) only if p_threshold exceeds 2**-j, the p-value of j folds all worse."""
    if tune.pruner != "wilcoxon":
        return
    if folds < WILCOXON_MIN_FOLDS:
        raise ConfigError(f"pruner: wilcoxon compares per-fold scores and can first prune after 2 folds, before "
                          f"a third: give --folds {WILCOXON_MIN_FOLDS} or more (got {folds})")
    smallest = 2.0 ** -(folds - 1)
    if tune.pruner_p <= smallest:
        raise ConfigError(f"pruner_p: with {folds} folds wilcoxon decides at most after {folds - 1} finished folds, "
                          f"where the smallest p-value (every fold worse) is {smallest:g}: give a p above "
                          f"{smallest:g} or more folds (got {tune.pruner_p:g})")


def pruner_params(tune: TuneConfig) -> dict[str, Any]:
    """The pruner and its settings, as the study run logs them."""
    settings = {"median": {"pruner_startup": tune.pruner_startup, "pruner_warmup": tune.pruner_warmup},
                "wilcoxon": {"pruner_p": tune.pruner_p}}
    return {"pruner": tune.pruner, **settings.get(tune.pruner, {})}


def reports_folds(tune: TuneConfig) -> bool:
    """Whether trials report one score per fold (step = fold) rather than one per epoch."""
    return tune.pruner == "wilcoxon"


class SameParamPruner(optuna.pruners.BasePruner):
    """Ask ``inner`` on a view of the study holding only the trials whose ``param`` equals the
    trial's own; a trial without ``param`` is judged against the whole study."""

    def __init__(self, inner: optuna.pruners.BasePruner, param: str):
        self.inner, self.param = inner, param

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if self.param not in trial.params:
            return self.inner.prune(study, trial)
        return self.inner.prune(same_param_view(study, self.param, trial.params[self.param], self.inner), trial)


def same_param_view(study: optuna.Study, param: str, value: Any, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """``study`` seen through its storage with every trial of another ``param`` value hidden.

    The storage is filtered, not only ``get_trials``: Hyperband builds its bracket studies from
    ``study._storage`` and reads the trials from there."""
    storage = ParamFilteredStorage(study._storage, param, value)
    return optuna.Study(study_name=study.study_name, storage=storage, sampler=study.sampler, pruner=pruner)


class ParamFilteredStorage:
    """A storage that lists only the trials with ``params[param] == value`` (and finds the best
    among them); everything else
    (writes included: successive halving records its rungs on the trial) goes to ``inner``."""

    def __init__(self, inner: optuna.storages.BaseStorage, param: str, value: Any):
        self._inner, self._param, self._value = inner, param, value

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        trials = self._inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        return [t for t in trials if t.params.get(self._param) == self._value]

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        # The RDB storage answers with one SQL query over every trial; Wilcoxon compares with this one.
        return optuna.storages.BaseStorage.get_best_trial(self, study_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
