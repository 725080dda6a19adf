"""`rockcls distill` (the MLproject `distill` entry point): train one student backbone from an
ensemble's softened probabilities, on the ensemble's own k-fold split.

The student is an ordinary train run (out-of-fold logits, checkpoints, resume, ``--devices``,
torchrun) with a teacher: `ensemble`, `predict` and the registry treat it like any other run, and
``--full-fit`` ends it with one network fitted on every image, the one that serves."""

from __future__ import annotations

import argparse

from rockcls.commands.train import report, train
from rockcls.core.config import TrainConfig, add_config_arguments, config_from_args
from rockcls.core.errors import ConfigError
from rockcls.runs.teacher import TEACHER_FORMS

SKIP = ("teacher_file",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rockcls distill",
                                     description="train one student backbone on an ensemble teacher's k-fold split")
    add_config_arguments(parser, TrainConfig, skip=SKIP)
    return parser


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(TrainConfig, build_parser().parse_args(argv))
    if not cfg.teacher and not cfg.resume:
        raise ConfigError(f"teacher: distill needs --teacher ({TEACHER_FORMS})")
    result = train(cfg)
    if result is not None:
        report(result)
    return 0
