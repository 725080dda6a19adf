"""Shared fixtures: every test gets its own MLflow store, image cache and output folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# The suite trains tiny models. With two OpenMP threads on two cores that other work shares, each
# parallel region waits for whichever thread was descheduled: a 3 ms forward pass of
# test_efficientnet took 60-240 ms. One thread here and in the processes the tests start (they
# inherit it; fold and tune workers set their own); set before torch is first imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from rockcls.core.config import TrainConfig, build_config  # noqa: E402
from rockcls.data.synthetic import make_dataset  # noqa: E402


_EMPTY_DB: Path | None = None  # see empty_mlflow_db


@pytest.fixture(scope="session", autouse=True)
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite database with every table and no experiment, copied by use_store: a new
    store runs MLflow's schema migrations, about a second each. MLflow adds the Default experiment,
    under the copy's own artifact root, when it first opens the copy."""
    global _EMPTY_DB
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("DELETE FROM experiments")
        db.commit()
    _EMPTY_DB = path
    yield path
    _EMPTY_DB = None


def use_store(mp: pytest.MonkeyPatch, root: Path) -> str:
    """Point MLflow and the image cache at a private SQLite store under ``root`` (cwd there too)."""
    import mlflow

    db = root / "mlflow.db"
    if _EMPTY_DB is not None and not db.exists():
        shutil.copyfile(_EMPTY_DB, db)
    uri = f"sqlite:///{db}"
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("ROCKCLS_CACHE_DIR", str(root / "cache"))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        mp.delenv(var, raising=False)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A private SQLite tracking store and artifact root for one test; cwd moves to tmp_path."""
    import mlflow

    yield use_store(monkeypatch, tmp_path)
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A private store shared by one test module, so its runs are trained once per module."""
    import mlflow

    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root)
        yield root
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """Three imbalanced synthetic texture classes, 40x40-ish PNGs (created once per session)."""
    return make_dataset(tmp_path_factory.mktemp("synthetic") / "train", [36, 24, 12], size=40, seed=1)


def tiny_config(data: Path | str, **overrides) -> TrainConfig:
    """A train config that runs in seconds on 2 CPU cores."""
    base = dict(data=str(data), backbone="test_efficientnet", pretrained=False, img_size=32, folds=2,
                epochs=2, batch_size=16, num_workers=0, hn_memory=64, warmup_epochs=0.5, device="cpu",
                augment="seed")
    base.update(overrides)
    return build_config(TrainConfig, base)


@pytest.fixture
def tiny_cfg():
    return tiny_config




def wait_for_a_new_timestamp_tick(ctime_ns: int) -> None:
    """File timestamps come from a coarse clock (a few ms): make sure the next write gets a later one."""
    while time.time_ns() < ctime_ns + 50_000_000:
        time.sleep(0.01)
