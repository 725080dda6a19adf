"""Which tracking store this process uses, and how it is shown: the URI (its password masked in
anything printed or logged), the database driver a URL needs, and the commands that browse or
clean the store."""

from __future__ import annotations

import functools
import os
import time

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import mlflow  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from rockcls.core import secrets  # noqa: E402
from rockcls.core.errors import ConfigError, RockclsError  # noqa: E402


# The pip package that brings each database driver SQLAlchemy may ask for.
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pymysql": "PyMySQL",
                   "MySQLdb": "mysqlclient", "pyodbc": "pyodbc"}


@functools.lru_cache(maxsize=8)
def check_driver(uri: str) -> None:
    """A database tracking store whose Python driver is missing: one line naming the package, not
    MLflow's 80-line ModuleNotFoundError at the first call."""
    if uri.split("://", 1)[0].split("+", 1)[0] not in ("postgresql", "postgres", "mysql", "mssql"):
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(uri).get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError, ValueError):
        return  # not a URL SQLAlchemy knows: MLflow says so itself
    except ImportError as exc:
        package = DRIVER_PACKAGES.get((exc.name or "").split(".")[0], exc.name)
        secrets.remember(uri)
        raise ConfigError(f"tracking store {secrets.mask_url(uri)}: its database driver {exc.name!r} is not "
                          f"installed (pip install '{package}')") from None


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def shown_uri() -> str:
    """The tracking URI as it may be printed or logged (password masked)."""
    uri = tracking_uri()
    secrets.remember(uri)
    return secrets.mask_url(uri)


def gc_command(run_id: str) -> str:
    """The ``mlflow gc`` command that purges a deleted run from this tracking store."""
    uri = shown_uri()
    flag = "--tracking-uri" if uri.startswith(("http://", "https://")) else "--backend-store-uri"
    return f"mlflow gc {flag} {uri} --run-ids {run_id}"


def browse_hint() -> str:
    """How to open the tracking store in a browser."""
    uri = shown_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def client() -> MlflowClient:
    check_driver(tracking_uri())
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return MlflowClient()  # a database store connects (and creates its tables) here, once per process
    except SQLAlchemyError as exc:
        detail = secrets.hidden_first_line(getattr(exc, "orig", None) or exc)
        raise RockclsError(f"tracking store {shown_uri()} cannot be opened: {detail}") from None


def retry(fn, *args, attempts: int = 6, **kwargs):
    """SQLite tracking stores report 'database is locked' under concurrent writers: back off."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if "locked" not in str(exc).lower() or i == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** i)
    return None


def found(what: str, call, *args):
    """``call(*args)``, or one line saying ``what`` is not in this store (an unknown run or
    experiment id), not MLflow's exception."""
    try:
        return call(*args)
    except MlflowException:
        raise RockclsError(f"{what} not found in the tracking store {shown_uri()}") from None
