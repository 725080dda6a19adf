"""Knowledge distillation: the teacher's cached probabilities and the student's loss.

The teacher is an ensemble of k-fold train runs on the student's split. For student fold k only the
members' fold-k networks may teach (they never saw fold k), so the cache holds one mixture per
fold: ``mix[k, i] = sum_m w_m softmax(z_mk(x_i))`` for every image i (in-sample for the rows fold k
trained on, out-of-fold for fold k's own rows). The teacher's scores for fold k are
``log(mix[k]) + bias``, the ensemble's own decision rule (`rockcls.runs.voting.blend`); a network
fitted on all images learns from ``log(mean_k mix[k]) + bias``, what the registered ensemble
itself predicts. The file is written by `rockcls.runs.teacher` and read here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rockcls.core.errors import ConfigError, first_line
from rockcls.training.checkpoint import write_npz_atomic

FORMAT = 1
EPS = 1e-12


@dataclass
class TeacherTargets:
    """Per-fold teacher mixtures over the rows of the teacher's split, with what made them."""

    ids: np.ndarray  # (N,) image ids, the members' OOF order
    fold: np.ndarray  # (N,) the split's fold of each row (-1: never validated)
    mix: np.ndarray  # (K, N, C) weighted mean member probabilities per fold's networks
    bias: np.ndarray  # (C,) the ensemble's per-class bias
    classes: list[str]
    meta: dict[str, Any]

    @property
    def split_fingerprint(self) -> str:
        return str(self.meta.get("split_fingerprint", ""))

    def scores(self, fold: int) -> np.ndarray:
        """The teacher's scores (log-probabilities up to the bias) of every row for student ``fold``;
        ``fold`` = the number of folds means the network fitted on all images (mean of the folds)."""
        mix = self.mix.mean(axis=0) if fold >= len(self.mix) else self.mix[fold]
        return (np.log(mix + EPS) + self.bias[None, :]).astype(np.float32)

    def aligned(self, ids: np.ndarray) -> "TeacherTargets":
        """The same targets reordered to ``ids`` (the student's index order)."""
        where = {str(i): k for k, i in enumerate(self.ids)}
        missing = [str(i) for i in ids if str(i) not in where]
        if missing:
            raise ConfigError(f"teacher: {len(missing)} image(s) of the data have no teacher prediction "
                              f"(first {missing[0]!r}); train the student on the teacher's data")
        order = np.asarray([where[str(i)] for i in ids], dtype=np.int64)
        return TeacherTargets(self.ids[order], self.fold[order], self.mix[:, order], self.bias, self.classes,
                              self.meta)


def save_teacher(path: Path, targets: TeacherTargets) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_npz_atomic(path, ids=np.asarray(targets.ids).astype(str), fold=targets.fold,
                     mix=targets.mix.astype(np.float32), bias=targets.bias.astype(np.float64),
                     classes=np.asarray(targets.classes).astype(str),
                     meta=np.asarray(json.dumps({"format": FORMAT, **targets.meta})))


def load_teacher(path: str | Path) -> TeacherTargets:
    """The cached teacher of ``path``; one line naming the file if it is missing or not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            targets = TeacherTargets(z["ids"], z["fold"].astype(np.int64), z["mix"].astype(np.float64),
                                     z["bias"].astype(np.float64), [str(c) for c in z["classes"]], meta)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"teacher_file: {path} is not a rockcls teacher file ({type(exc).__name__}: "
                          f"{first_line(exc, 120)}); run distill again "
                          f"to rebuild it") from None
    if meta.get("format") != FORMAT or targets.mix.ndim != 3 or targets.mix.shape[1] != len(targets.ids):
        raise ConfigError(f"teacher_file: {path} has an unknown layout; run distill again to rebuild it")
    return targets


def check_teacher_split(targets: TeacherTargets, *, split_fingerprint: str, classes: list[str], folds: int,
                        data: str) -> None:
    """Refuse a teacher whose split is not the student's: its fold-k networks would have seen
    the student's fold-k images, and the student's out-of-fold score would be optimistic."""
    ref = targets.meta.get("teacher", "the teacher")
    if targets.classes != list(classes):
        raise ConfigError(f"teacher: {ref} predicts classes {targets.classes}, the data under {data} has {list(classes)}")
    if len(targets.mix) != folds or targets.split_fingerprint != split_fingerprint:
        raise ConfigError(f"teacher: {ref} was trained on another split than this run's ({len(targets.mix)} folds, "
                          f"split fingerprint {targets.split_fingerprint} != {split_fingerprint}): train the student "
                          f"on the teacher's data with its folds and split_seed")


def distillation_losses(logits: torch.Tensor, hard: torch.Tensor, teacher: torch.Tensor, *,
                        temperature: float, weight: float) -> torch.Tensor:
    """Per-sample ``(1 - weight) * hard + weight * T^2 * KL(teacher_T || student_T)``.

    ``hard`` is the per-sample cross-entropy with the labels; ``teacher`` the teacher's scores of
    the same samples. T^2 keeps the soft term's gradient on the scale of the hard one (Hinton et al.)."""
    t = temperature
    soft_teacher = F.log_softmax(teacher.float() / t, dim=1)
    soft_student = F.log_softmax(logits.float() / t, dim=1)
    kl = (soft_teacher.exp() * (soft_teacher - soft_student)).sum(1)
    return (1.0 - weight) * hard + weight * (t * t) * kl
