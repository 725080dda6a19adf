"""A train run's fold runs in the tracking store: finding one, reading a finished one's result,
and failing one whose process died before it could end its run itself."""

from __future__ import annotations

import contextlib
import logging

import numpy as np

from rockcls.core import names, tracking

log = logging.getLogger("rockcls")

VIEW_PREFIX = "logits_tta_"  # OOF logits of fewer test-time views, in oof_fold.npz and oof_logits.npz


def fold_label(fold: int, kind: str = "fold") -> str:
    """How logs name a fold (``kind`` full: the network fitted on every image)."""
    return "the network on every image" if kind == "full" else f"fold {fold}"


def find_fold_run(parent_id: str, fold: int, kind: str = "fold") -> tuple[str | None, bool]:
    """(run id or None, whether that fold finished) of fold ``fold`` of train run ``parent_id``
    (``kind`` full: the network fitted on every image, numbered after the last fold)."""
    for run in tracking.child_runs(parent_id, kind=kind):
        if run.data.tags.get(names.FOLD) == str(fold):
            return run.info.run_id, run.data.tags.get(names.COMPLETE) == "true"
    return None, False


def load_fold_result(fold_run: str) -> dict:
    """The out-of-fold rows, logits and score a finished fold run logged."""
    with np.load(tracking.download(fold_run, names.OOF_FOLD)) as z:
        views = {k[len(VIEW_PREFIX):]: z[k] for k in z.files if k.startswith(VIEW_PREFIX)}
        return {"rows": z["rows"], "logits": z["logits"], "score": float(z["score"]), "view_logits": views}


def finished_fold_result(fold_run: str, fold: int, kind: str = "fold") -> dict:
    """What a fold finished by an earlier attempt gave (the network on every image gives no OOF
    result): the one way a resumed run, in this process or with folds in processes, collects it."""
    log.info("%s already finished in run %s: skipped", fold_label(fold, kind), fold_run)
    return load_fold_result(fold_run) if kind == "fold" else {}


def fail_fold_run(parent_id: str, fold: int, reason: str) -> str | None:
    """End the fold's run FAILED with ``reason`` if it is still RUNNING (its process was killed);
    a run its process ended itself keeps its own status and reason. Returns the run id."""
    run_id, done = find_fold_run(parent_id, fold)
    if run_id is None or done:
        return run_id
    if tracking.get_run(run_id).info.status == "RUNNING":
        with contextlib.suppress(Exception):
            tracking.set_tags(run_id, {names.FAIL_REASON: reason[:500]})
        tracking.end_run(run_id, "FAILED")
    return run_id
