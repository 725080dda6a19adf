"""MLflow's system metrics on train, fold, predict, ensemble and evaluate runs (the System Metrics
tab), labelled per fold process under --devices, and off by a switch."""

from __future__ import annotations

from rockcls.core import system_metrics, tracking
from rockcls.training.trainer import run_training

from tests.conftest import tiny_config

CPU = "cpu_utilization_percentage"


def system_keys(run_id: str) -> set[str]:
    return {k for k in tracking.get_run(run_id).data.metrics if k.startswith("system/")}


def test_a_train_run_and_each_fold_run_carry_system_metrics_and_the_switch_turns_them_off(mlflow_store, synthetic_dir,
                                                                                        monkeypatch):
    run = run_training(tiny_config(synthetic_dir, epochs=1)).run_id
    assert {f"system/{CPU}", "system/system_memory_usage_megabytes", "system/disk_usage_percentage",
            "system/network_receive_megabytes"} <= system_keys(run)
    folds = tracking.child_runs(run, kind="fold")
    assert len(folds) == 2 and all(f"system/{CPU}" in system_keys(f.info.run_id) for f in folds)

    off = run_training(tiny_config(synthetic_dir, epochs=1, system_metrics=False)).run_id
    assert not system_keys(off) and not any(system_keys(f.info.run_id) for f in tracking.child_runs(off, kind="fold"))
    monkeypatch.setenv(system_metrics.SYSTEM_METRICS_ENV, "false")
    env_off = run_training(tiny_config(synthetic_dir, epochs=1, seed=3)).run_id
    assert not system_keys(env_off)


def test_fold_processes_of_devices_label_their_system_metrics(devices_run, open_store):
    open_store(devices_run)  # its folds ran in processes on cpu,cpu (tests/conftest.py)
    folds = tracking.child_runs(devices_run.result.run_id, kind="fold")
    assert len(folds) == 2
    for fold in folds:
        assert f"system/cpu/{CPU}" in system_keys(fold.info.run_id)
