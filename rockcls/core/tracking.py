"""Everything about runs in MLflow: runs, params, metrics, artifacts, dataset inputs, a step's
writes gathered in one `RunUpdate`, and the context manager that ends a run (`closing`). Which
store (`rockcls.core.store`) and which experiment (`rockcls.core.experiments`) are decided
beside it; the registry and the pyfunc model are in `rockcls.runs.registry`; the other modules
log only through these.

Runs are addressed by id through ``MlflowClient`` (no global active-run stack), so a train
run can nest under a study/trial run and several processes can log side by side.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import mlflow  # noqa: E402
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from rockcls.core import names, secrets
from rockcls.core.downloads import download_root  # noqa: E402
from rockcls.core.experiments import experiment_id, experiment_name  # noqa: E402
from rockcls.core.store import client, found, retry, shown_uri  # noqa: E402
from rockcls.core.config import FALSE_WORDS, TRUE_WORDS  # noqa: E402
from rockcls.core.errors import RockclsError, RunStopped, first_line  # noqa: E402
from rockcls.core.processes import Terminated  # noqa: E402

log = logging.getLogger("rockcls")

MAX_PARAM_LEN = 6000
# How `mlflow run` logs a parameter left empty (it logs the shell-quoted value).
NOT_GIVEN = ("", "''")


def start_run(*, experiment: str, name: str, kind: str, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None, adopt_env_run: bool = False) -> str:
    """Create a run (or adopt the one ``mlflow run`` made) named ``name`` and return its id.

    A child run goes in its parent's experiment; any other in `experiment_id(experiment)`.
    """
    all_tags = {names.KIND: kind, names.RUN_NAME: name, **(tags or {})}
    exp_id = get_run(parent_run_id).info.experiment_id if parent_run_id else experiment_id(experiment)
    env_run = os.environ.get("MLFLOW_RUN_ID") if adopt_env_run else None
    if env_run:
        set_tags(env_run, all_tags)
        return env_run
    if parent_run_id:
        all_tags[names.PARENT] = parent_run_id
    # What mlflow.start_run would add (user, source, git commit): the Source and Created by columns.
    return retry(client().create_run, exp_id, tags={**context_tags(), **all_tags}).info.run_id


_program: dict[str, str] = {}


def set_program(name: str) -> None:
    """Name the command (``rockcls train``) that the runs this process creates show as Source
    ("" = MLflow's own guess, the script's file name)."""
    if name:
        _program["name"] = name
    else:
        _program.pop("name", None)


@functools.lru_cache(maxsize=1)
def _resolved_context_tags() -> dict[str, str]:
    from mlflow.tracking.context.registry import resolve_tags

    return dict(resolve_tags())  # looks for a git repository: once per process


def context_tags() -> dict[str, str]:
    tags = _resolved_context_tags()
    return {**tags, names.SOURCE_NAME: _program["name"]} if "name" in _program else dict(tags)


def set_description(run_id: str, text: str) -> None:
    """The run's description (markdown) on its page and in the runs table."""
    set_tags(run_id, {names.NOTE: text})


def log_dataset(run_id: str, *, name: str, digest: str, source: str, profile: Mapping[str, Any],
                context: str) -> None:
    """The dataset as a run input (the Dataset column and filter): a reference, not a copy."""
    dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}),
                      profile=json.dumps(dict(profile)))
    tags = [InputTag(key="mlflow.data.context", value=context)]
    retry(client().log_inputs, run_id, datasets=[DatasetInput(dataset=dataset, tags=tags)])


def get_run(run_id: str):
    return found(f"run {run_id!r}", client().get_run, run_id)


def reopen_run(run_id: str) -> None:
    """A resumed run RUNNING again, without the failure reason its interruption left."""
    if names.FAIL_REASON in get_run(run_id).data.tags:
        retry(client().delete_tag, run_id, names.FAIL_REASON)
    retry(client().update_run, run_id, status="RUNNING")


@contextlib.contextmanager
def closing(run_id: str, *, finish: bool = True) -> Iterator[str]:
    """End ``run_id`` with the block: FINISHED (unless ``finish`` is false: the caller goes on with
    it); KILLED when interrupted or stopped on purpose (`RunStopped`, e.g. a pruned trial); FAILED
    otherwise, SIGTERM (`Terminated`) included. A run that does not finish keeps its one-line
    reason in the tag ``rockcls.fail_reason``."""
    try:
        yield run_id
    except BaseException as exc:
        stopped = isinstance(exc, (KeyboardInterrupt, RunStopped)) and not isinstance(exc, Terminated)
        status = "KILLED" if stopped else "FAILED"
        reason = secrets.hidden_first_line(exc, 500)
        with contextlib.suppress(Exception):  # the store may be what failed; the original error matters
            set_tags(run_id, {names.FAIL_REASON: reason[:500]})
        end_run(run_id, status)
        raise
    if finish:
        end_run(run_id, "FINISHED")


def end_run(run_id: str, status: str = "FINISHED") -> None:
    retry(client().set_terminated, run_id, status=status)


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    batch = [RunTag(k, str(v)) for k, v in tags.items()]
    retry(client().log_batch, run_id, tags=batch)


def param(run: Any, key: str, default: str = "") -> str:
    """The value a run used: ``resolved.<key>`` where `log_params` had to put it (the parameter was
    given to ``mlflow run`` empty or otherwise), else ``<key>``."""
    params = run.data.params
    return params.get(f"resolved.{key}", params.get(key, default))


def log_params(run_id: str, params: Mapping[str, Any]) -> list[str]:
    """Log params; a key already logged with another value (``mlflow run`` logs the raw -P
    values, empty for a parameter not given) is kept and the resolved value goes to
    ``resolved.<key>``. Returns the keys that were given with another value."""
    existing = get_run(run_id).data.params
    batch, conflicts = [], []
    for key, value in params.items():
        text = str(value)[:MAX_PARAM_LEN]
        if key in existing and existing[key] != text and not same_value(existing[key], text):
            if existing[key] not in NOT_GIVEN:
                conflicts.append(key)
            key = f"resolved.{key}"
        if existing.get(key) is None:
            batch.append(Param(key, text))
    for i in range(0, len(batch), 90):
        retry(client().log_batch, run_id, params=batch[i:i + 90])
    return conflicts


def same_value(a: str, b: str) -> bool:
    """Whether two param texts say the same: equal numbers ("1e-3", "0.001"), or the same switch
    in any of the words config accepts for it ("true" = "1" = "yes", "false" = "0" = "no")."""
    return _canonical(a) == _canonical(b)


def _canonical(text: str) -> float | str:
    word = text.strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return 1.0 if word in TRUE_WORDS else 0.0
    try:
        return float(word)
    except ValueError:
        return text.strip()


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
    retry(client().log_batch, run_id, metrics=batch)


def log_linked_metrics(run_id: str, metrics: Mapping[str, float], *, dataset_name: str, dataset_digest: str,
                       model_id: str | None) -> None:
    """Metrics of an evaluation, linked to the dataset they were measured on and, when there is
    one, the logged model they measure (MLflow 3 shows them on the model's page)."""
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0, model_id=model_id, dataset_name=dataset_name, dataset_digest=dataset_digest)
             for k, v in metrics.items()]
    retry(client().log_batch, run_id, metrics=batch)


def metric_steps(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client().get_metric_history(run_id, key))


@dataclass
class RunUpdate:
    """What one step of a command writes to a run, gathered before anything is written: the caller
    decides what to log, `update_run` logs it (params first: they may conflict; the description
    last: it describes what was written)."""

    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    step: int | None = None
    files: list[tuple[Path, str | None]] = field(default_factory=list)  # (local file, artifact folder)
    texts: dict[str, str] = field(default_factory=dict)  # artifact file -> its text
    dicts: dict[str, Any] = field(default_factory=dict)  # artifact file (.json/.yaml) -> its content
    figures: dict[str, Any] = field(default_factory=dict)  # artifact file -> matplotlib figure
    datasets: list[dict[str, Any]] = field(default_factory=list)  # `log_dataset` keywords
    description: str | None = None


def update_run(run_id: str, update: RunUpdate) -> list[str]:
    """Write ``update`` to ``run_id``; returns the params `mlflow run` had logged with other values."""
    conflicts = log_params(run_id, update.params) if update.params else []
    for path, folder in update.files:
        log_file(run_id, path, folder)
    for artifact_file, text in update.texts.items():
        log_text(run_id, text, artifact_file)
    for artifact_file, data in update.dicts.items():
        log_dict(run_id, data, artifact_file)
    for artifact_file, fig in update.figures.items():
        log_figure(run_id, fig, artifact_file)
    for dataset in update.datasets:
        log_dataset(run_id, **dataset)
    if update.metrics:
        log_metrics(run_id, update.metrics, step=update.step)
    if update.tags:
        set_tags(run_id, update.tags)
    if update.description is not None:
        set_description(run_id, update.description)
    return conflicts


def log_file(run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    retry(client().log_artifact, run_id, str(path), artifact_path)


def log_dict(run_id: str, data: Any, artifact_file: str) -> None:
    retry(client().log_dict, run_id, data, artifact_file)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    retry(client().log_text, run_id, text, artifact_file)


def log_figure(run_id: str, fig, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    retry(client().log_figure, run_id, fig, artifact_file)
    plt.close(fig)


def log_image(run_id: str, image, *, key: str, step: int) -> None:
    """An image (PIL or uint8 array) that the run's page shows under ``key``, with a step slider
    (MLflow 3's stepped images: ``images/<key>+step+<step>+...`` artifacts)."""
    retry(client().log_image, run_id, image, key=key, step=step, synchronous=True)


def has_image(run_id: str, *, key: str, step: int) -> bool:
    """Whether ``run_id`` already shows an image under ``key`` at ``step`` (a resumed run must not
    log it twice: MLflow names each logged image with a fresh uuid)."""
    prefix = f"{key.replace('/', '~')}+step+{step}+"
    return any(path.rsplit("/", 1)[-1].startswith(prefix) for path in list_artifacts(run_id, "images"))


def log_image_file(run_id: str, image, artifact_file: str) -> None:
    """An image (PIL or uint8 array) as the artifact ``artifact_file`` (a ``.png``)."""
    retry(client().log_image, run_id, image, artifact_file=artifact_file)


def download(run_id: str, artifact_path: str, dst: str | None = None) -> Path:
    """The artifact, under ``dst`` (the caller's folder) or else under this process's download
    folder, which is removed when the process exits."""
    dst = dst or tempfile.mkdtemp(dir=download_root())
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=dst))
    except (MlflowException, OSError) as exc:
        raise RockclsError(f"run {run_id}: artifact {artifact_path!r} unavailable ({first_line(exc, 160)})") from None


def list_artifacts(run_id: str, path: str | None = None) -> list[str]:
    return [a.path for a in client().list_artifacts(run_id, path)]


def child_runs(parent_run_id: str, kind: str | None = None) -> list:
    run = get_run(parent_run_id)
    filt = f"tags.`{names.PARENT}` = '{parent_run_id}'"
    if kind:
        filt += f" and tags.`{names.KIND}` = '{kind}'"
    return client().search_runs([run.info.experiment_id], filter_string=filt, max_results=5000)


def copy_dataset_inputs(src_run_id: str, dst_run_id: str, *, context: str) -> None:
    """Log the datasets of one run as inputs of another (the same entries: same name and digest)."""
    inputs = get_run(src_run_id).inputs
    tags = [InputTag(key="mlflow.data.context", value=context)]
    datasets = [DatasetInput(dataset=d.dataset, tags=tags) for d in (inputs.dataset_inputs if inputs else [])]
    if datasets:
        retry(client().log_inputs, dst_run_id, datasets=datasets)


def search_runs(experiment: str, filter_string: str = "", order_by: Iterable[str] | None = None,
                max_results: int = 1000) -> list:
    """Runs of `experiment_id(experiment)` (which must exist)."""
    return client().search_runs([experiment_id(experiment, create=False)], filter_string=filter_string,
                                order_by=list(order_by or []), max_results=max_results)


def delete_run(run_id: str) -> None:
    """Soft-delete: hidden from the UI and searches; ``mlflow gc`` removes it for good."""
    retry(client().delete_run, run_id)


def run_location(run_id: str) -> str:
    """``experiment 'NAME', tracking URI``: where a run can be found."""
    return f"experiment {experiment_name(get_run(run_id).info.experiment_id)!r}, tracking {shown_uri()}"


