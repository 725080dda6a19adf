"""How every command line runs its ``main(argv)``: an error caused by the user's input (and any
MLflow error) ends as one line on stderr and exit status 2, an interrupt as 130, passwords masked.
SIGTERM (``kill PID``, a scheduler stopping the job) ends the command's runs FAILED with the reason
instead of leaving them RUNNING, and is one line and status 2 too."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from mlflow.exceptions import MlflowException

from rockcls.core.errors import RockclsError
from rockcls.core.processes import Terminated, sigterm_raises
from rockcls.core.secrets import hidden_first_line, hide, remember


def run_command(fn, argv: list[str]) -> int:
    remember(os.environ.get("MLFLOW_TRACKING_URI", ""))  # a database tracking store may hold a password
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    try:
        with sigterm_raises():
            return int(fn(argv) or 0)
    except (RockclsError, Terminated) as exc:
        print(f"rockcls: error: {hide(str(exc))}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        print(f"rockcls: error: MLflow: {hidden_first_line(exc, 500)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("rockcls").warning("interrupted")
        return 130
