"""`python -m rockcls COMMAND ...`: dispatch to each command's own `main(argv)`.

Errors caused by the user's input end as one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

from rockcls.errors import RockclsError

COMMANDS = {
    "train": ("rockcls.train", "k-fold training of a timm backbone"),
    "predict": ("rockcls.predict", "predict a folder or CSV with a train run or registered model"),
    "ensemble": ("rockcls.ensemble", "weighted soft voting of train runs, optionally registered"),
    "prepare": ("rockcls.cache", "index, validate and cache a dataset ahead of training"),
    "demo": ("rockcls.demo", "synthetic data -> train -> predict -> ensemble on the CPU"),
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
    from rockcls import tracking
    from rockcls.progress import setup_logging

    setup_logging()
    tracking.set_program(f"rockcls {argv[0]}")
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return run_command(module.main, argv[1:])


def run_command(fn, argv: list[str]) -> int:
    from mlflow.exceptions import MlflowException

    from rockcls.secrets import hide, remember

    remember(os.environ.get("MLFLOW_TRACKING_URI", ""))  # a database tracking store may hold a password
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    try:
        return int(fn(argv) or 0)
    except RockclsError as exc:
        print(f"rockcls: error: {hide(str(exc))}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        print(f"rockcls: error: MLflow: {hide(str(exc).splitlines()[0])}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("rockcls").warning("interrupted")
        return 130
