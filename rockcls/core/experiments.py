"""Which experiment a command logs to and searches, by one rule (`experiment_id`): the one
``mlflow run`` chose (its ``--experiment-name``, else Default), else ``MLFLOW_EXPERIMENT_NAME`` /
``MLFLOW_EXPERIMENT_ID``, else the ``experiment`` option, else ``rockcls``. So train, ensemble,
predict and tune runs of one workflow land in one experiment and find each other however they
are started."""

from __future__ import annotations

import os

from mlflow.exceptions import MlflowException

from rockcls.core import names
from rockcls.core.errors import ConfigError, RockclsError
from rockcls.core.store import client, found, retry, shown_uri

DEFAULT_EXPERIMENT = "rockcls"


DEFAULT_EXPERIMENT_ID = "0"  # MLflow's Default experiment


# One line per item: the MLflow UI renders a single newline as a line break.
EXPERIMENT_NOTE = """Runs of rockcls image classification, one kind per `rockcls.kind` tag:

* **train**: k-fold training of one backbone (children: one **fold** run each); score `cv_macro_f1` (out-of-fold macro-F1). Repeat one with the command line in its description.
* **ensemble**: weighted soft voting of train runs, scored honestly (`ensemble_macro_f1`, cross-fitted); its logged model is in this experiment's Models tab, registered versions in the registry.
* **study** (children: **trial** runs, the study's **ensemble**): an Optuna search; `best_macro_f1` per finished trial.
* **predict**: predictions of a folder or CSV with a train run or registered model.

Sort by `metrics.cv_macro_f1` to rank train runs; `rockcls ensemble --top K` takes the best K.
"""


def chosen_experiment() -> tuple[str, str] | None:
    """(experiment id, what chose it) when the environment chose the experiment, else None.

    ``mlflow run`` creates its run before rockcls starts and passes MLFLOW_RUN_ID with the
    experiment's MLFLOW_EXPERIMENT_ID; users may set MLFLOW_EXPERIMENT_NAME or _ID themselves.
    """
    env_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if env_id and os.environ.get("MLFLOW_RUN_ID"):
        return env_id, "`mlflow run`"
    env_name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if env_name:
        return _id_by_name(env_name, create=True), "MLFLOW_EXPERIMENT_NAME"
    if env_id:
        return env_id, "MLFLOW_EXPERIMENT_ID"
    return None


def experiment_id(requested: str = "", *, create: bool = True) -> str:
    """The experiment a command logs to and searches: the one the environment chose
    (`chosen_experiment`), else ``requested``, else ``rockcls``.

    A ``requested`` name other than the chosen experiment's could not take effect, so it is
    refused rather than ignored.
    """
    chosen = chosen_experiment()
    if chosen is None:
        return _id_by_name(requested or DEFAULT_EXPERIMENT, create=create)
    exp_id, chooser = chosen
    exp = _experiment(exp_id)
    if requested and requested != exp.name:
        fix = (f"give `--experiment-name {requested}` to mlflow run instead" if chooser == "`mlflow run`"
               else f"unset {chooser} or leave experiment empty")
        raise ConfigError(f"experiment: {requested!r} cannot take effect: {chooser} chose experiment "
                          f"{exp.name!r}; {fix}")
    # `mlflow run --experiment-name` creates the experiment without a description; Default is
    # everybody's catch-all, so it is left as it is.
    if exp_id != DEFAULT_EXPERIMENT_ID and names.NOTE not in exp.tags:
        retry(client().set_experiment_tag, exp_id, names.NOTE, EXPERIMENT_NOTE)
    return exp_id


def _experiment(exp_id: str):
    return found(f"experiment id {exp_id}", client().get_experiment, exp_id)


def experiment_name(exp_id: str) -> str:
    return _experiment(exp_id).name


def _id_by_name(name: str, *, create: bool) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        raise RockclsError(f"experiment {name!r} not found in {shown_uri()}")
    try:
        return c.create_experiment(name, tags={names.NOTE: EXPERIMENT_NOTE})
    except MlflowException:  # another worker created it first
        return c.get_experiment_by_name(name).experiment_id
