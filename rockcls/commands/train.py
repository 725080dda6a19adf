"""`rockcls train` (the MLproject `train` entry point): parse the typed config and run k-fold training.

Started by ``torchrun`` (WORLD_SIZE > 1), every rank runs this command and trains each fold together
(`rockcls.training.distributed`); rank 0 alone tracks and prints. With ``--teacher`` the run is
distilled (`rockcls distill`): the teacher's probabilities are computed (or read from the cache)
on rank 0 first."""

from __future__ import annotations

import argparse

from rockcls.core import names, store, tracking
from rockcls.core.config import TrainConfig, add_config_arguments, config_from_args
from rockcls.runs.teacher import prepare_teacher
from rockcls.training import distributed
from rockcls.training.trainer import TrainResult, run_training

SKIP = ("teacher_file",)  # written by the teacher step, not given


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rockcls train", description="k-fold training of a timm backbone, tracked in MLflow")
    add_config_arguments(parser, TrainConfig, skip=SKIP)
    return parser


def train(cfg: TrainConfig) -> TrainResult | None:
    """Run ``cfg`` (distilled when it names a teacher); the result on rank 0, None on the others."""
    with distributed.session(cfg.device) as dist:
        tags = None
        if cfg.teacher or (cfg.resume and _resumes_a_student(cfg)):
            cfg = distributed.from_main(dist, lambda: prepare_teacher(cfg))
            tags = {names.TEACHER: cfg.teacher}
        result = run_training(cfg, dist=dist, tags=tags)
        return result if dist.main else None


def _resumes_a_student(cfg: TrainConfig) -> bool:
    return bool(tracking.get_run(cfg.resume).data.tags.get(names.TEACHER))


def report(result: TrainResult) -> None:
    print(f"train run {result.run_id}: cv_macro_f1 {result.cv_macro_f1:.4f} ({tracking.run_location(result.run_id)})")
    print(f"browse it with: {store.browse_hint()}")


def main(argv: list[str] | None = None) -> int:
    result = train(config_from_args(TrainConfig, build_parser().parse_args(argv)))
    if result is not None:
        report(result)
    return 0
