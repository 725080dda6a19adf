"""`rockcls ensemble` (the MLproject `ensemble` entry point): fit soft voting over train runs, log it, optionally register it."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from rockcls.core import system_metrics, tracking
from rockcls.core.config import (
    EXPERIMENT_DEFAULT,
    add_config_arguments,
    command_flags,
    config_from_args,
    option,
)
from rockcls.runs.ensemble import (
    cheapest_views,
    fit_ensemble,
    load_members,
    log_ensemble,
    members_tta,
    top_runs,
    view_set_scores,
)
from rockcls.runs.lookup import has_full_network
from rockcls.runs.registry import register_ensemble
from rockcls.training.transforms import TTA_VIEWS


NETWORK_CHOICES = ("auto", "folds", "full")


@dataclass
class EnsembleConfig:
    """Parameters of `rockcls ensemble` (the MLproject `ensemble` entry point)."""

    runs: str = option("", "comma-separated train run ids; empty = the top runs of the experiment")
    experiment: str = option("", f"experiment searched for top runs and where the ensemble run is logged; "
                               f"{EXPERIMENT_DEFAULT}")
    top: int = option(3, "how many top runs by cv_macro_f1 when runs is empty", min=1)
    bias: bool = option(True, "also search a per-class logit bias")
    register: str = option("", "registered model name; empty = do not register")
    force: bool = option(False, "move the champion alias even without improvement")
    tta: str = option("auto", "test-time augmentation of the registered model; auto = the views the members' "
                            "out-of-fold predictions (and so the honest score) used, or with full networks the "
                            "fewest views within 0.5 points of the best on those rows", choices=("auto", *TTA_VIEWS))
    networks: str = option("auto", "what the registered model runs of each member: folds (its k fold networks), "
                                 "full (its one network fitted on every image, train --full-fit), auto (full when "
                                 "every member has one)", choices=NETWORK_CHOICES)
    seed: int = option(0, "seed of the cross-fitting partition when the runs used one holdout (folds=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rockcls ensemble",
                                     description="weighted soft voting of train runs, optionally registered")
    add_config_arguments(parser, EnsembleConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(EnsembleConfig, build_parser().parse_args(argv))
    run_ids = [r.strip() for r in cfg.runs.split(",") if r.strip()] or top_runs(cfg.experiment, cfg.top)
    members = load_members(run_ids)
    fit = fit_ensemble(members, bias=cfg.bias, seed=cfg.seed)
    if cfg.networks == "auto":
        weighted = [r for r, w in zip(fit.run_ids, fit.weights) if w > 0]
        cfg = dataclasses.replace(cfg, networks="full" if all(has_full_network(r) for r in weighted) else "folds")
    views = view_set_scores(members, fit)
    if cfg.tta == "auto":
        cfg = dataclasses.replace(cfg, tta=cheapest_views(views) if cfg.networks == "full" and views
                                  else members_tta(members))
    repeat = dataclasses.replace(cfg, runs=",".join(run_ids))
    run_id = log_ensemble(fit, experiment=cfg.experiment,
                          params={"bias": cfg.bias, "seed": cfg.seed, "tta": cfg.tta, "top": cfg.top,
                                  "register": cfg.register, "force": cfg.force, "networks": cfg.networks},
                          command=" ".join(["python -m rockcls ensemble", *command_flags(repeat, skip=("top",))]))
    tracking.log_metrics(run_id, {f"ensemble_macro_f1.tta_{v}": score for v, score in views.items()})
    with tracking.closing(run_id), system_metrics.system_metrics(run_id):
        print(fit.score_table().to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if views:
            print("by test-time views (rule above, OOF rows): " + ", ".join(f"{v} {s:.4f}" for v, s in views.items())
                  + f"; registered: tta {cfg.tta}, {cfg.networks} networks")
        if cfg.register:
            reg = register_ensemble(fit, name=cfg.register, run_id=run_id, tta=cfg.tta, force=cfg.force,
                                    networks=cfg.networks)
            print(reg.summary())
    print(f"ensemble run {run_id}: {fit.strategy}, honest macro-F1 {fit.crossfit_score:.4f} "
          f"(best member {fit.best_member_score:.4f}, equal weights {fit.equal_weight_score:.4f}, "
          f"fitted in-sample {fit.insample_score:.4f})")
    return 0
