"""`rockcls train` (the MLproject `train` entry point): parse the typed config and run k-fold training.

Started by ``torchrun`` (WORLD_SIZE > 1), every rank runs this command and trains each fold together
(`rockcls.training.distributed`); rank 0 alone tracks and prints."""

from __future__ import annotations

import argparse

from rockcls.core import tracking
from rockcls.core.config import TrainConfig, add_config_arguments, config_from_args
from rockcls.training import distributed
from rockcls.training.trainer import run_training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rockcls train", description="k-fold training of a timm backbone, tracked in MLflow")
    add_config_arguments(parser, TrainConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(TrainConfig, build_parser().parse_args(argv))
    with distributed.session(cfg.device) as dist:
        result = run_training(cfg, dist=dist)
        if not dist.main:
            return 0
    print(f"train run {result.run_id}: cv_macro_f1 {result.cv_macro_f1:.4f} ({tracking.run_location(result.run_id)})")
    print(f"browse it with: {tracking.browse_hint()}")
    return 0
