"""Shared fixtures: every test gets its own MLflow store, image cache and output folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
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


# ---- finished train runs that tests of several modules only read -------------------------------

@dataclass
class Trained:
    """Train runs in a store of their own (``root``, ``uri``); ``result`` is the first one's."""

    root: Path
    uri: str
    results: list

    @property
    def result(self):
        return self.results[0]


def train_in_own_store(root: Path, *configs: TrainConfig) -> Trained:
    import mlflow
    from rockcls.training.trainer import run_training

    with pytest.MonkeyPatch.context() as mp:
        uri = use_store(mp, root)
        results = [run_training(cfg) for cfg in configs]
    mlflow.set_tracking_uri(None)
    return Trained(root, uri, results)


@pytest.fixture
def open_store(monkeypatch):
    """``open_store(trained)``: this test's MLflow calls, cache and cwd go to a shared fixture's store.
    Only for tests that leave its runs as they are."""
    import mlflow

    yield lambda trained: use_store(monkeypatch, trained.root)
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def two_fold_run(tmp_path_factory, synthetic_dir) -> Trained:
    """2 folds of 2 epochs with hard negatives and a 5-image gallery every epoch: read by
    test_train and test_gallery."""
    return train_in_own_store(tmp_path_factory.mktemp("two-fold"), tiny_config(
        synthetic_dir, epochs=2, hn_ratio=0.25, gallery_size=5, gallery_every=1))


@pytest.fixture(scope="session")
def devices_run(tmp_path_factory, synthetic_dir) -> Trained:
    """The same with each fold in a process of its own (devices cpu,cpu) and 4-image galleries: read
    by test_scale, test_gallery and test_system_metrics (fold processes take seconds to start)."""
    return train_in_own_store(tmp_path_factory.mktemp("devices"), tiny_config(
        synthetic_dir, epochs=2, devices="cpu,cpu", hn_ratio=0.25, gallery_size=4, gallery_every=1))


@pytest.fixture(scope="session")
def split_runs(tmp_path_factory, synthetic_dir) -> Trained:
    """Three 1-epoch runs: a; b on a's split with another lr and training seed; c on another split
    (split_seed 7). test_train reads them; test_ensemble also logs its ensembles of them there."""
    return train_in_own_store(tmp_path_factory.mktemp("split"), *(
        tiny_config(synthetic_dir, epochs=1, **extra) for extra in ({}, dict(lr=1e-3, seed=7), dict(split_seed=7))))


def wait_for_a_new_timestamp_tick(ctime_ns: int) -> None:
    """File timestamps come from a coarse clock (a few ms): make sure the next write gets a later one."""
    while time.time_ns() < ctime_ns + 50_000_000:
        time.sleep(0.01)
