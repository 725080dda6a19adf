"""The k-fold training run: data -> split -> one MLflow parent run -> one child run per fold.

`run_training` is the one training function that the CLI, MLproject and the Optuna search call.
The rooms it walks through: `plan` (data, split, settings, derived figures), `record` (what the
tracking store holds of the run), `fold` (one fold's epochs), `parallel` / `distributed` (folds in
processes, torchrun ranks). A killed run continues with ``resume=<parent run id>``."""

from __future__ import annotations

import shutil
from typing import Callable

from rockcls.core.config import TrainConfig
from rockcls.core.devices import parse_devices
from rockcls.core.errors import ConfigError
from rockcls.training import record
from rockcls.training.distributed import SINGLE, Dist, from_main
from rockcls.training.fold import EpochHook, run_fold
from rockcls.training.parallel import run_folds_in_processes
from rockcls.training.plan import Plan, build_plan
from rockcls.training.record import TrainResult

FoldHook = Callable[[int, float], None]


def run_training(cfg: TrainConfig, *, parent_run_id: str | None = None, kind: str = "train",
                 tags: dict[str, str] | None = None, on_epoch_end: EpochHook | None = None,
                 on_fold_end: FoldHook | None = None, dist: Dist = SINGLE) -> TrainResult:
    """Train every fold of ``cfg`` (resuming ``cfg.resume`` if set) and return out-of-fold results.

    ``on_epoch_end(fold, epoch, metrics)`` is called after each logged epoch; it may raise to stop
    (`RunStopped`, e.g. a pruned trial, ends the runs as KILLED, anything else as FAILED).
    ``on_fold_end(fold, oof_macro_f1)`` is called after each fold's result is saved (a fold finished
    by an earlier attempt included), and may raise the same way.
    With ``cfg.devices`` the folds run concurrently in processes of their own
    (`rockcls.training.parallel`); under torchrun (``dist``) every rank trains each fold together
    and rank 0 alone tracks (`rockcls.training.distributed`).
    """
    if (cfg.devices or dist.active) and (on_epoch_end is not None or on_fold_end is not None):
        raise ConfigError("devices: an epoch or fold hook (a study's pruning) needs the folds in this process; "
                          "leave devices empty (the study runs one trial per device instead)")
    if cfg.resume:
        cfg = from_main(dist, lambda: record.resumed_config(cfg))
    plan = build_plan(cfg, dist, kind=kind)
    cfg = plan.cfg
    run_id = from_main(dist, lambda: record.open_train_run(plan, parent_run_id=parent_run_id, tags=tags))
    with record.closing_on_main(dist, run_id), record.system_metrics_on_main(dist, run_id, cfg,
                                                                               resume=bool(cfg.resume)):
        if cfg.devices:
            fold_results = run_folds_in_processes(cfg, run_id, plan.folds_to_run, parse_devices(cfg.devices))
        else:
            fold_results = {}
            for k in plan.folds_to_run:
                fold_results[k] = run_fold(plan, run_id, k, on_epoch_end)
                if on_fold_end is not None:
                    on_fold_end(k, float(fold_results[k]["score"]))
        if cfg.full_fit:
            run_fold(plan, run_id, cfg.folds, None, kind="full")
        return from_main(dist, lambda: finish(plan, run_id, fold_results))


def finish(plan: Plan, run_id: str, fold_results: dict[int, dict]) -> TrainResult:
    """The run's OOF result logged, then its local files removed (on rank 0)."""
    result = record.finish_train_run(plan, run_id, fold_results)
    shutil.rmtree(plan.cfg.run_dir(run_id), ignore_errors=True)
    return result
