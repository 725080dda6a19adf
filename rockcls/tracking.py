"""Everything MLflow: runs, params, metrics, artifacts. The only module that imports mlflow.

Runs are addressed by id through ``MlflowClient`` (no global active-run stack), so a train
run can nest under a study/trial run and several processes can log side by side.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from rockcls import secrets  # noqa: E402
from rockcls.errors import RockclsError  # noqa: E402

KIND = "rockcls.kind"
PARENT = "mlflow.parentRunId"
MAX_PARAM_LEN = 6000


def client() -> MlflowClient:
    return MlflowClient()


def _retry(fn, *args, attempts: int = 6, **kwargs):
    """SQLite tracking stores report 'database is locked' under concurrent writers: back off."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if "locked" not in str(exc).lower() or i == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** i)
    return None


def experiment_id(name: str) -> str:
    """The id of experiment ``name`` (created if missing), or the one ``mlflow run`` chose."""
    env = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if env and os.environ.get("MLFLOW_RUN_ID"):
        return env
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except MlflowException:  # another worker created it first
        return c.get_experiment_by_name(name).experiment_id


def start_run(*, experiment: str, name: str, kind: str, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None, adopt_env_run: bool = False) -> str:
    """Create a run (or adopt the one ``mlflow run`` made) and return its id."""
    all_tags = {KIND: kind, **(tags or {})}
    env_run = os.environ.get("MLFLOW_RUN_ID") if adopt_env_run else None
    if env_run:
        set_tags(env_run, all_tags)
        return env_run
    if parent_run_id:
        all_tags[PARENT] = parent_run_id
    all_tags["mlflow.runName"] = name
    exp_id = get_run(parent_run_id).info.experiment_id if parent_run_id else experiment_id(experiment)
    return _retry(client().create_run, exp_id, tags=all_tags).info.run_id


def get_run(run_id: str):
    try:
        return client().get_run(run_id)
    except MlflowException:
        raise RockclsError(f"run {run_id!r} not found in the tracking store {shown_uri()}") from None


def reopen_run(run_id: str) -> None:
    _retry(client().update_run, run_id, status="RUNNING")


def end_run(run_id: str, status: str = "FINISHED") -> None:
    _retry(client().set_terminated, run_id, status=status)


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    batch = [RunTag(k, str(v)) for k, v in tags.items()]
    _retry(client().log_batch, run_id, tags=batch)


def log_params(run_id: str, params: Mapping[str, Any]) -> list[str]:
    """Log params; a key already logged with another value (``mlflow run`` logs the raw -P
    values) is kept and the resolved value goes to ``resolved.<key>``. Returns those keys."""
    existing = get_run(run_id).data.params
    batch, conflicts = [], []
    for key, value in params.items():
        text = str(value)[:MAX_PARAM_LEN]
        if key in existing and existing[key] != text and not _same_number(existing[key], text):
            conflicts.append(key)
            key = f"resolved.{key}"
        if existing.get(key) is None:
            batch.append(Param(key, text))
    for i in range(0, len(batch), 90):
        _retry(client().log_batch, run_id, params=batch[i:i + 90])
    return conflicts


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip().lower() in ("true", "1") and b.strip().lower() in ("true", "1")


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
    _retry(client().log_batch, run_id, metrics=batch)


def metric_steps(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client().get_metric_history(run_id, key))


def log_file(run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    _retry(client().log_artifact, run_id, str(path), artifact_path)


def log_dict(run_id: str, data: Any, artifact_file: str) -> None:
    _retry(client().log_dict, run_id, data, artifact_file)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    _retry(client().log_text, run_id, text, artifact_file)


def log_figure(run_id: str, fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    _retry(client().log_figure, run_id, fig, artifact_file)
    plt.close(fig)


def download(run_id: str, artifact_path: str, dst: str | None = None) -> Path:
    dst = dst or tempfile.mkdtemp(prefix="rockcls-")
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=dst))
    except (MlflowException, OSError) as exc:
        raise RockclsError(f"run {run_id}: artifact {artifact_path!r} unavailable ({str(exc).splitlines()[0][:160]})") from None


def list_artifacts(run_id: str, path: str | None = None) -> list[str]:
    return [a.path for a in client().list_artifacts(run_id, path)]


def child_runs(parent_run_id: str, kind: str | None = None) -> list:
    run = get_run(parent_run_id)
    filt = f"tags.`{PARENT}` = '{parent_run_id}'"
    if kind:
        filt += f" and tags.`{KIND}` = '{kind}'"
    return client().search_runs([run.info.experiment_id], filter_string=filt, max_results=5000)


def search_runs(experiment: str, filter_string: str = "", order_by: Iterable[str] | None = None,
                max_results: int = 1000) -> list:
    exp = client().get_experiment_by_name(experiment)
    if exp is None:
        raise RockclsError(f"experiment {experiment!r} not found in {shown_uri()}")
    return client().search_runs([exp.experiment_id], filter_string=filter_string,
                                order_by=list(order_by or []), max_results=max_results)


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def shown_uri() -> str:
    """The tracking URI as it may be printed or logged (password masked)."""
    uri = tracking_uri()
    secrets.remember(uri)
    return secrets.mask_url(uri)


def delete_run(run_id: str) -> None:
    """Soft-delete: hidden from the UI and searches; ``mlflow gc`` removes it for good."""
    _retry(client().delete_run, run_id)


def gc_command(run_id: str) -> str:
    """The ``mlflow gc`` command that purges a deleted run from this tracking store."""
    uri = shown_uri()
    flag = "--tracking-uri" if uri.startswith(("http://", "https://")) else "--backend-store-uri"
    return f"mlflow gc {flag} {uri} --run-ids {run_id}"

