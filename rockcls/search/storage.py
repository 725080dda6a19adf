"""Where the study lives: the Optuna storage URL (--storage, $ROCKCLS_STORAGE, else next to a local MLflow store), never shown with its password, and the RDB storage with heartbeats."""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import optuna

from rockcls.core import names, secrets, store, tracking
from rockcls.core.errors import ConfigError
from rockcls.search.bookkeeping import StaleTrialHandler

log = logging.getLogger("rockcls")


def default_storage_url(tracking_uri: str) -> str:
    """``optuna.db`` beside a SQLite MLflow database, else in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def resolve_storage_url(storage: str, tracking_uri: str) -> str:
    """The storage given, else ``$ROCKCLS_STORAGE``, else the default; its password is remembered
    so that no log line or error prints it."""
    source = "storage"
    if not storage and os.environ.get(secrets.STORAGE_ENV, "").strip():
        storage, source = os.environ[secrets.STORAGE_ENV].strip(), secrets.STORAGE_ENV
    if not storage:
        return default_storage_url(tracking_uri)
    secrets.remember(storage)
    if "://" not in storage:
        raise ConfigError(f"{source}: {secrets.mask_url(storage)!r} is not a database URL "
                          f"(e.g. sqlite:///optuna.db or postgresql://user@host/db)")
    scheme, rest = storage.split("://", 1)
    # SQLAlchemy 2.1 maps postgresql:// to psycopg 3; psycopg2-binary is what rockcls installs.
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg2://{rest}"
    return storage


def refuse_logged_password(storage: str) -> None:
    """Under ``mlflow run`` (MLFLOW_RUN_ID set), a password in ``-P storage`` is already in the
    tracking store: MLflow logged it as a parameter of the run this study would adopt, and
    parameters cannot be edited. Fail that run and say how to erase it and where the password goes.

    The run is not deleted here: ``mlflow run`` marks it FAILED after this process exits, which
    fails with a 30-line traceback on a deleted run (MLflow 3.17 sets the status even when the run
    already ended)."""
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if not env_run or not secrets.url_secrets(storage):
        return
    tracking.end_run(env_run, "FAILED")
    tracking.set_tags(env_run, {names.FAIL_REASON: "storage: a password in -P storage (logged as a parameter)"})
    raise ConfigError(f"storage: holds a password, which `mlflow run` has logged as a parameter of run {env_run} "
                      f"(now FAILED): erase it with `mlflow runs delete --run-id {env_run}` then "
                      f"`{store.gc_command(env_run)}`, and pass the password in ${secrets.STORAGE_ENV} or "
                      f"~/.pgpass instead (-P storage=postgresql://user@host/db)")


def warn_visible_password(storage: str) -> None:
    if secrets.url_secrets(storage):
        log.warning("storage: a password on the command line is visible to other users of this machine (ps); "
                    "prefer $%s or ~/.pgpass", secrets.STORAGE_ENV)


def build_storage(url: str, *, heartbeat: int, retries: int, attempts: int = 5) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats, so a trial whose worker died is failed and queued again.

    Processes opening a fresh database at once race on creating Optuna's tables (one gets an
    IntegrityError on ``alembic_version``): the loser retries and finds them made.
    """
    from sqlalchemy.exc import SQLAlchemyError

    secrets.remember(url)  # worker processes get the URL from the plan, not from resolve_storage_url
    sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": 300}} if sqlite else {"pool_pre_ping": True}
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                                     heartbeat_stale_trial_callback=StaleTrialHandler(retries))
            break
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            if attempt == attempts - 1:
                raise cannot_open(url, exc) from None
            time.sleep(0.5 * (attempt + 1))
        except (ImportError, ValueError) as exc:
            raise cannot_open(url, exc) from None
    if storage.engine.dialect.name == "sqlite":
        serialize_sqlite_transactions(storage.engine)
    return storage


def cannot_open(url: str, exc: BaseException) -> ConfigError:
    # SQLAlchemy renders the URL into some messages: password included.
    return ConfigError(f"storage: cannot open {secrets.mask_url(url)}: {secrets.hidden_first_line(exc)}")


def serialize_sqlite_transactions(engine) -> None:
    """Make Optuna's WAITING -> RUNNING switch atomic on SQLite.

    pysqlite starts a transaction only at the first write, so the read-check-update in
    ``set_trial_state_values`` races between processes (measured here: 3 processes took 21 of
    300 queued trials twice). ``BEGIN IMMEDIATE`` takes the write lock before the read.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _driver_leaves_transactions_to_us(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed
