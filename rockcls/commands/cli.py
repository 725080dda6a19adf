"""`python -m rockcls COMMAND ...`: dispatch to each command's own `main(argv)`.

Errors caused by the user's input end as one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import sys

from rockcls.core import tracking
from rockcls.core.entry import run_command
from rockcls.core.progress import setup_logging

# Each command's module is imported only when that command runs (importlib below): `--help` of the
# dispatcher stays fast, and a command never pays for another's imports.

COMMANDS = {
    "train": ("rockcls.commands.train", "k-fold training of a timm backbone"),
    "distill": ("rockcls.commands.distill", "train one student backbone from an ensemble teacher"),
    "predict": ("rockcls.commands.predict", "predict a folder or CSV with a train run or registered model"),
    "evaluate": ("rockcls.commands.evaluate", "score a model on labelled images; log its mistakes and calibration"),
    "ensemble": ("rockcls.commands.ensemble", "weighted soft voting of train runs, optionally registered"),
    "prepare": ("rockcls.commands.prepare", "index, validate and cache a dataset ahead of training"),
    "demo": ("rockcls.commands.demo", "synthetic data -> train -> predict -> ensemble on the CPU"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items())
    return f"usage: python -m rockcls COMMAND [--help] [options]\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"rockcls: error: unknown command {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    setup_logging()
    tracking.set_program(f"rockcls {argv[0]}")
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return run_command(module.main, argv[1:])
