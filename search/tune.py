"""Optuna search of rockcls training: `python search/tune.py --trials 50 --data DIR [...]`.

Every train parameter given here (flag or ``--config`` YAML key) is fixed for all trials; the
search varies the rest of lr, hn_ratio, balanced_ratio, hn_memory (and optionally
label_smoothing, augment) within the ``--search-*`` ranges; ``--search-backbone`` adds the
backbone (with its weights and resolution) and replaces the fixed ``--backbone``. Re-running the
same command resumes the study up to ``--trials`` finished trials. See docs/search.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from rockcls.core import tracking
from rockcls.core.config import TrainConfig, add_config_arguments, config_from_args
from rockcls.search.space import STUDY_OWNED, TuneConfig, build_search_config
from rockcls.search.study import run_study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="search/tune.py",
                                     description="Optuna study over rockcls training runs, tracked in MLflow")
    add_config_arguments(parser.add_argument_group("study"), TuneConfig)
    add_config_arguments(parser.add_argument_group("training (a value given here is fixed for every trial)"),
                         TrainConfig, skip=STUDY_OWNED)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    tracking.set_program("search/tune.py")
    tune = config_from_args(TuneConfig, ns)
    base, fixed = build_search_config({f.name: getattr(ns, f.name) for f in fields(TrainConfig)
                                       if f.name not in STUDY_OWNED})
    outcome = run_study(base, tune, fixed)
    print(outcome.summary())
    return 1 if any(outcome.worker_codes) else 0


if __name__ == "__main__":
    from rockcls.core.entry import run_command
    from rockcls.core.progress import setup_logging

    setup_logging()
    sys.exit(run_command(main, sys.argv[1:]))
