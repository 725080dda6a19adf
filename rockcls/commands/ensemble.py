"""`rockcls ensemble` (the MLproject `ensemble` entry point): fit soft voting over train runs, log it, optionally register it."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from rockcls.core import tracking
from rockcls.core.config import (
    EXPERIMENT_DEFAULT,
    add_config_arguments,
    command_flags,
    config_from_args,
    option,
)
from rockcls.runs.ensemble import (
    fit_ensemble,
    load_members,
    log_ensemble,
    members_tta,
    top_runs,
)
from rockcls.runs.registry import register_ensemble
from rockcls.training.transforms import TTA_VIEWS


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
                            "out-of-fold predictions (and so the honest score) used", choices=("auto", *TTA_VIEWS))
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
    if cfg.tta == "auto":
        cfg = dataclasses.replace(cfg, tta=members_tta(members))
    repeat = dataclasses.replace(cfg, runs=",".join(run_ids))
    run_id = log_ensemble(fit, experiment=cfg.experiment,
                          params={"bias": cfg.bias, "seed": cfg.seed, "tta": cfg.tta, "top": cfg.top,
                                  "register": cfg.register, "force": cfg.force},
                          command=" ".join(["python -m rockcls ensemble", *command_flags(repeat, skip=("top",))]))
    with tracking.closing(run_id):
        print(fit.score_table().to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if cfg.register:
            reg = register_ensemble(fit, name=cfg.register, run_id=run_id, tta=cfg.tta, force=cfg.force)
            print(reg.summary())
    print(f"ensemble run {run_id}: {fit.strategy}, honest macro-F1 {fit.crossfit_score:.4f} "
          f"(best member {fit.best_member_score:.4f}, equal weights {fit.equal_weight_score:.4f}, "
          f"fitted in-sample {fit.insample_score:.4f})")
    return 0
