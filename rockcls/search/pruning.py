"""Pruning within groups: a trial is compared only with the trials that share its value of one
searched parameter (the backbone), because a wide backbone's first epoch is not a narrow one's."""

from __future__ import annotations

from typing import Any, Container

import optuna
from optuna.trial import FrozenTrial, TrialState


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
