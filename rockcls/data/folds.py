"""The split of a dataset into stratified folds (or one holdout) and its fingerprint, which every
run of one ensemble, a resumed run and each fold process must share."""

from __future__ import annotations

import hashlib
import math

import numpy as np

from rockcls.core.errors import DataError
from rockcls.data.index import DatasetIndex, content_fingerprint


def make_folds(labels: np.ndarray, *, folds: int, val_fraction: float, seed: int) -> np.ndarray:
    """Fold id of each sample: its validation fold. folds=1: 0 for the holdout, -1 train-only."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    counts = np.bincount(labels)
    need = max(folds, 2)
    if counts.min() < need:
        cls = int(np.argmin(counts))
        raise DataError(f"data: class #{cls} has {counts.min()} image(s), fewer than the {need} "
                        f"a stratified split with folds={folds} needs")
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    positions = np.arange(len(labels))
    if folds == 1:
        _check_holdout(len(labels), len(counts), val_fraction)
        _, val = train_test_split(positions, test_size=val_fraction, stratify=labels, random_state=seed)
        fold_of[val] = 0
        return fold_of
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(positions, labels)):
        fold_of[val] = k
    return fold_of


def _check_holdout(n: int, classes: int, val_fraction: float) -> None:
    """A stratified holdout needs an image of every class on each side (as scikit-learn counts)."""
    n_val = math.ceil(val_fraction * n)
    if n_val < classes:
        raise DataError(f"data: folds=1 with val_fraction={val_fraction} holds out {n_val} of {n} images, "
                        f"fewer than the {classes} classes; raise val_fraction or add images")
    if n - n_val < classes:
        raise DataError(f"data: folds=1 with val_fraction={val_fraction} leaves {n - n_val} of {n} images "
                        f"to train on, fewer than the {classes} classes; lower val_fraction or add images")


def split_fingerprint(index: DatasetIndex, fold_of: np.ndarray) -> str:
    h = hashlib.sha1(content_fingerprint(index).encode())
    h.update(np.asarray(fold_of, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]
