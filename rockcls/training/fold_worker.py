"""One fold of a train run in a process of its own (started by `rockcls.training.parallel` for
``train --devices``): ``python -m rockcls.training.fold_worker --config C --parent RUN --fold K``."""

from __future__ import annotations

import argparse
import sys

from rockcls.core import tracking
from rockcls.core.config import TrainConfig, build_config
from rockcls.core.processes import hear_interrupts
from rockcls.training.fold import run_fold
from rockcls.training.plan import build_plan
from rockcls.training.record import check_run_split


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rockcls.training.fold_worker",
                                     description="one fold of a rockcls train run (started by train --devices)")
    parser.add_argument("--config", required=True, help="the train run's resolved config (YAML)")
    parser.add_argument("--parent", required=True, help="the train run's id")
    parser.add_argument("--fold", type=int, required=True, help="the fold to train")
    parser.add_argument("--device", default="", help="this process's device (cpu, cuda)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hear_interrupts()  # the train process stops this one with SIGINT
    tracking.set_program("rockcls train (fold process)")
    cfg = build_config(TrainConfig, {"config": args.config, "device": args.device or None})
    plan = build_plan(cfg, describe=False)
    check_run_split(plan, args.parent, f"fold {args.fold}")
    run_fold(plan, args.parent, args.fold, None, label=(args.device or cfg.device).replace(":", ""))
    return 0


if __name__ == "__main__":
    from rockcls.core.entry import run_command
    from rockcls.core.progress import setup_logging

    setup_logging()
    sys.exit(run_command(main, sys.argv[1:]))
