"""MLflow's system metrics on a run (its System Metrics tab): CPU, memory, disk, network and NVIDIA
GPUs, sampled while a block runs, on by default and off for every command with
``ROCKCLS_SYSTEM_METRICS=false``."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from rockcls.core.store import tracking_uri

log = logging.getLogger("rockcls")


SYSTEM_METRICS_ENV = "ROCKCLS_SYSTEM_METRICS"


SYSTEM_METRICS_INTERVAL_ENV = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"  # MLflow's own setting


SYSTEM_METRICS_INTERVAL = 10.0  # seconds: a point every 10 s, and one more as the run ends


def system_metrics_on(enabled: bool = True) -> bool:
    """Whether a run logs system metrics: ``enabled`` (a command's switch) and not turned off for
    every command by ``ROCKCLS_SYSTEM_METRICS=false``."""
    return enabled and os.environ.get(SYSTEM_METRICS_ENV, "").strip().lower() not in ("0", "false", "off", "no")


@contextlib.contextmanager
def system_metrics(run_id: str, *, label: str = "", enabled: bool = True, resume: bool = False) -> Iterator[None]:
    """MLflow's system-metrics monitor (CPU, memory, disk, network, NVIDIA GPUs) on ``run_id``
    while the block runs: its System Metrics tab. ``label`` names the process's device or node in
    the metric names (``system/<label>/cpu_utilization_percentage``) when several processes log to
    one run or its folds. Every run gets at least one point: the last sample is logged as it ends."""
    if not system_metrics_on(enabled):
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per run
    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL, samples_before_logging=1,
                                   resume_logging=resume, node_id=label or None, tracking_uri=tracking_uri())
    monitor.start()
    try:
        yield
    except BaseException:
        monitor.finish()  # no last sample: a failing run ends as fast as it can
        raise
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
    except Exception as exc:  # noqa: BLE001 - system metrics never fail the run they describe
        log.debug("system metrics: last sample not logged (%s)", exc)
    monitor.finish()
