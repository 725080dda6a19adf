"""Weighted soft voting of train runs, fitted for macro-F1 on their out-of-fold predictions.

Decision rule (the same as `rockcls.inference.predictor`): ``argmax_c log(sum_m w_m softmax(z_m))_c + b_c``,
weights ``w`` on the simplex and an optional per-class bias ``b``.

A search over weights and bias always wins in-sample and often loses on new data: on small OOF
sets it fits noise (measured on Lithology: fitted 0.6755 cross-fitted, equal weights 0.6770). So
the ensemble is chosen among candidates by an honest score, and only a fitted rule has to earn it:

- equal weights, and each member alone: nothing is fitted, their OOF score is honest as it is;
- fitted weights, and fitted weights + per-class bias: coordinate ascent on macro-F1 on a coarse
  grid, scored by cross-fitting (fitted on the other folds' OOF rows, scored on the held-out fold).

The candidate with the best honest score wins; ties go to the simpler rule (the order above). So
the registered ensemble never scores below equal weights or below its best member."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from rockcls.core import experiments, names, tracking
from rockcls.core.errors import ConfigError, RockclsError
from rockcls.core.metrics import confusion_figure, macro_f1, per_class_f1, safe_name, softmax
from rockcls.runs.lookup import check_train_run
from rockcls.runs.voting import blend, crossfit_groups, fit_weights
from rockcls.training.fold_runs import VIEW_PREFIX

log = logging.getLogger("rockcls")


SPLIT_TAGS = ((names.DATA_FINGERPRINT, "data fingerprint"), (names.SPLIT_SEED, "split seed"),
              (names.FOLDS, "folds"), (names.SPLIT_FINGERPRINT, "split fingerprint"))


@dataclass
class Member:
    """One train run's out-of-fold predictions (``fold`` -1: never validated, NaN logits)."""

    run_id: str
    name: str
    ids: np.ndarray
    labels: np.ndarray
    fold: np.ndarray
    logits: np.ndarray
    classes: list[str]
    tags: dict[str, str] = field(default_factory=dict)
    tta: str = "none"
    view_logits: dict[str, np.ndarray] = field(default_factory=dict)  # OOF logits of fewer views (none, flip)


def load_member(run_id: str) -> Member:
    run = check_train_run(run_id)
    with np.load(tracking.download(run_id, names.OOF_LOGITS), allow_pickle=False) as z:
        views = {k[len(VIEW_PREFIX):]: z[k].astype(np.float32) for k in z.files if k.startswith(VIEW_PREFIX)}
        return Member(run_id, run.data.tags.get(names.RUN_NAME, run_id[:8]), z["ids"], z["labels"],
                      z["fold"], z["logits"].astype(np.float32), [str(c) for c in z["classes"]],
                      dict(run.data.tags), tracking.param(run, "tta", "none"), views)


def load_members(run_ids: Sequence[str]) -> list[Member]:
    """Members in the given order; all must share data, seed, folds and split (else an error)."""
    if not run_ids:
        raise ConfigError("runs: no train runs given")
    dupes = sorted({r for r in run_ids if list(run_ids).count(r) > 1})
    if dupes:
        raise ConfigError(f"runs: run {dupes[0]} given more than once")
    members = [load_member(r) for r in run_ids]
    check_same_split(members)
    return members


def members_tta(members: Sequence[Member]) -> str:
    """The test-time views the members' out-of-fold logits were made with, when they agree: the
    registered model then predicts the way its honest score was measured."""
    views = {m.tta for m in members}
    if len(views) == 1:
        return views.pop()
    log.warning("members used different OOF views (%s); the registered model uses none", ", ".join(sorted(views)))
    return "none"


# Fewer test-time views are chosen when they cost at most this much macro-F1 (cross-fitted rule,
# out-of-fold rows): on Lithology one view of a lite0 network scores 2-3 points under eight.
VIEW_TOLERANCE = 0.005
VIEW_COST = ("none", "flip", "d4")  # cheapest first


def view_set_scores(members: Sequence[Member], fit: "EnsembleFit") -> dict[str, float]:
    """Macro-F1 of the fitted rule on the OOF rows with each view set every member recorded
    (the members' own views included)."""
    sets = set(VIEW_COST)
    for m in members:
        sets &= set(m.view_logits) | {m.tta}
    keep = scored_rows(members)
    out = {}
    for name in [v for v in VIEW_COST if v in sets]:
        logits = [m.logits if m.tta == name else m.view_logits[name] for m in members]
        probs = np.stack([softmax(z[keep].astype(np.float64)) for z in logits])
        out[name] = macro_f1(fit.labels, blend(probs, fit.weights, fit.bias).argmax(1), len(fit.classes))
    return out


def cheapest_views(scores: dict[str, float], tolerance: float = VIEW_TOLERANCE) -> str:
    """The fewest views whose score is within ``tolerance`` of the best view set's."""
    best = max(scores.values())
    return next(v for v in VIEW_COST if v in scores and scores[v] >= best - tolerance)


def check_same_split(members: Sequence[Member]) -> None:
    """Refuse members whose OOF rows are not the same samples in the same folds."""
    ref = members[0]
    for m in members[1:]:
        diffs = [f"{label} {m.tags.get(key)} != {ref.tags.get(key)}" for key, label in SPLIT_TAGS
                 if m.tags.get(key) != ref.tags.get(key)]
        if m.classes != ref.classes:
            diffs.append(f"classes {m.classes} != {ref.classes}")
        if not diffs and (not np.array_equal(m.ids, ref.ids) or not np.array_equal(m.fold, ref.fold)):
            diffs.append("the OOF rows differ")
        if diffs:
            raise RockclsError(f"runs: run {m.run_id} does not share the split of run {ref.run_id} "
                               f"({'; '.join(diffs)}); ensemble members must be trained on the same data "
                               f"with the same split_seed and folds")


def top_runs(experiment: str, k: int, *, kind: str = "train", parent_run_id: str | None = None,
             same_split: bool = True) -> list[str]:
    """Ids of the ``k`` completed runs of ``kind`` with the best ``cv_macro_f1``.

    With ``same_split`` only runs sharing the best run's split qualify (others could not be
    ensembled with it); those left out are logged.
    """
    filt = f"tags.`{names.KIND}` = '{kind}' and tags.`{names.COMPLETE}` = 'true'"
    if parent_run_id:
        filt += f" and tags.`{names.PARENT}` = '{parent_run_id}'"
    runs = [r for r in tracking.search_runs(experiment, filt, order_by=["metrics.cv_macro_f1 DESC"])
            if "cv_macro_f1" in r.data.metrics]
    if not runs:
        name = experiments.experiment_name(experiments.experiment_id(experiment, create=False))  # "" names no one
        raise RockclsError(f"experiment {name!r} has no completed {kind} run with cv_macro_f1")
    if same_split:
        split = runs[0].data.tags.get(names.SPLIT_FINGERPRINT)
        other = [r.info.run_id for r in runs if r.data.tags.get(names.SPLIT_FINGERPRINT) != split]
        if other:
            log.info("top runs: %d run(s) on another split than the best run %s left out (%s)",
                     len(other), runs[0].info.run_id, ", ".join(other[:5]))
        runs = [r for r in runs if r.data.tags.get(names.SPLIT_FINGERPRINT) == split]
    return [r.info.run_id for r in runs[:k]]


@dataclass
class EnsembleFit:
    """The chosen rule and the scores to judge it by (all macro-F1 on the scored OOF rows)."""

    run_ids: list[str]
    names: list[str]
    classes: list[str]
    weights: np.ndarray
    bias: np.ndarray
    strategy: str
    member_scores: dict[str, float]
    equal_weight_score: float
    insample_score: float
    crossfit_score: float
    crossfit_per_class: dict[str, float]
    labels: np.ndarray
    crossfit_preds: np.ndarray
    num_groups: int
    candidates: dict[str, float] = field(default_factory=dict)
    split: dict[str, str] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """The honest macro-F1 of the chosen rule: what the champion alias compares."""
        return self.crossfit_score

    @property
    def best_member_score(self) -> float:
        return max(self.member_scores.values())

    @property
    def name(self) -> str:
        """``ensemble-<K>-<hash of members, weights and bias>``: two different ensembles never share it."""
        rule = {"runs": self.run_ids, "weights": [round(float(w), 6) for w in self.weights],
                "bias": [round(float(b), 6) for b in self.bias]}
        return f"ensemble-{len(self.run_ids)}-{hashlib.sha1(json.dumps(rule).encode()).hexdigest()[:6]}"

    def describe(self, command: str) -> str:
        """Markdown: the members and weights, the rule, the honest score, and how to repeat it."""
        rows = "\n".join(f"| {n} | `{r}` | {w:.3f} | {self.member_scores[r]:.4f} |"
                         for n, r, w in zip(self.names, self.run_ids, self.weights))
        # The score comes first: the run page shows the first lines of a description until "Show more".
        return (f"**Ensemble** of {len(self.run_ids)} train runs, weighted soft voting; rule chosen by honest score: "
                f"**{self.strategy}**.\n\n"
                f"**Honest macro-F1 {self.crossfit_score:.4f}** (cross-fitted over {self.num_groups} groups); best "
                f"member {self.best_member_score:.4f}, equal weights {self.equal_weight_score:.4f}, fitted in-sample "
                f"{self.insample_score:.4f} (optimistic).\n\n| member | run | weight | OOF macro-F1 |\n|---|---|---|---|\n"
                f"{rows}\n\nRepeat it:\n\n```\n{command}\n```")

    def score_table(self) -> pd.DataFrame:
        rows = [{"model": f"member {n}", "run_id": r, "weight": float(w), "macro_f1": self.member_scores[r],
                 "estimate": "OOF"} for n, r, w in zip(self.names, self.run_ids, self.weights)]
        rows.append({"model": "equal weights", "run_id": "", "weight": np.nan, "macro_f1": self.equal_weight_score,
                     "estimate": "OOF"})
        rows += [{"model": name, "run_id": "", "weight": np.nan, "macro_f1": score,
                  "estimate": f"cross-fitted over {self.num_groups} groups"}
                 for name, score in self.candidates.items() if name.startswith("fitted")]
        rows += [{"model": "fitted", "run_id": "", "weight": np.nan, "macro_f1": self.insample_score,
                  "estimate": "in-sample (optimistic)"},
                 {"model": f"chosen: {self.strategy}", "run_id": "", "weight": np.nan,
                  "macro_f1": self.crossfit_score, "estimate": "honest"}]
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"members": [{"run_id": r, "name": n, "weight": float(w), "oof_macro_f1": self.member_scores[r]}
                            for r, n, w in zip(self.run_ids, self.names, self.weights)],
                "classes": list(self.classes), "bias": {c: float(v) for c, v in zip(self.classes, self.bias)},
                "strategy": self.strategy,
                "scores": {"crossfit_macro_f1": self.crossfit_score, "insample_macro_f1": self.insample_score,
                           "equal_weight_macro_f1": self.equal_weight_score, "crossfit_groups": self.num_groups,
                           "candidates": dict(self.candidates)},
                "split": dict(self.split)}


def scored_rows(members: Sequence[Member]) -> np.ndarray:
    """Rows every member validated (fold >= 0, finite logits)."""
    keep = members[0].fold >= 0
    for m in members:
        keep &= np.isfinite(m.logits).all(axis=1)
    if keep.sum() < 2:
        raise RockclsError(f"ensemble: run {members[0].run_id} has fewer than 2 validated OOF rows")
    return keep


@dataclass
class _Candidate:
    name: str
    weights: np.ndarray
    bias: np.ndarray
    preds: np.ndarray  # honest predictions of every scored row
    score: float
    insample: float


def _crossfit(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, bias: bool) -> np.ndarray:
    """Predictions of every row by weights (and bias) fitted on the other groups only."""
    preds = np.empty(len(labels), dtype=np.int64)
    for g in np.unique(groups):
        fit_rows, held = groups != g, groups == g
        w_g, b_g, _ = fit_weights(probs[:, fit_rows], labels[fit_rows], bias=bias)
        preds[held] = blend(probs[:, held], w_g, b_g).argmax(1)
    return preds


def _candidates(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray, names: Sequence[str], *,
                bias: bool) -> list[_Candidate]:
    """Every rule with its honest predictions, simplest first (ties go to the earlier one)."""
    n_members, _, num_classes = probs.shape
    zero = np.zeros(num_classes)

    def fixed(name: str, w: np.ndarray) -> _Candidate:
        preds = blend(probs, w, zero).argmax(1)
        score = macro_f1(labels, preds, num_classes)
        return _Candidate(name, w, zero, preds, score, score)

    out = [fixed("equal weights", np.full(n_members, 1.0 / n_members))]
    if n_members > 1:
        out += [fixed(f"member {name}", np.eye(n_members)[i]) for i, name in enumerate(names)]
    rules = ([("fitted weights", False)] if n_members > 1 else []) + ([("fitted weights + bias", True)] if bias else [])
    for name, with_bias in rules:
        preds = _crossfit(probs, labels, groups, bias=with_bias)
        w, b, insample = fit_weights(probs, labels, bias=with_bias)
        out.append(_Candidate(name, w, b, preds, macro_f1(labels, preds, num_classes), insample))
    return out


def fit_ensemble(members: Sequence[Member], *, bias: bool = True, seed: int = 0) -> EnsembleFit:
    """Choose the rule with the best honest score among equal weights, single members and fitted rules."""
    keep = scored_rows(members)
    probs = np.stack([softmax(m.logits[keep].astype(np.float64)) for m in members])
    labels = members[0].labels[keep].astype(np.int64)
    classes, num_classes = members[0].classes, len(members[0].classes)
    member_scores = {m.run_id: macro_f1(labels, probs[i].argmax(1), num_classes) for i, m in enumerate(members)}
    groups = crossfit_groups(members[0].fold[keep], labels, seed=seed)
    cands = _candidates(probs, labels, groups, [m.name for m in members], bias=bias)
    best = max(cands, key=lambda c: c.score)  # max keeps the first of equal scores: the simpler rule
    split = {key: members[0].tags.get(key, "") for key, _ in SPLIT_TAGS}
    return EnsembleFit([m.run_id for m in members], [m.name for m in members], classes, best.weights, best.bias,
                       best.name, member_scores, cands[0].score, cands[-1].insample, best.score,
                       per_class_f1(labels, best.preds, classes), labels, best.preds, int(len(np.unique(groups))),
                       {c.name: c.score for c in cands}, split)


def log_ensemble(fit: EnsembleFit, *, experiment: str, params: dict[str, Any] | None = None,
                 parent_run_id: str | None = None, tags: dict[str, str] | None = None, command: str = "") -> str:
    """An open run tagged ``rockcls.kind=ensemble`` with weights, bias, scores and the confusion matrix;
    ``command`` (default: ``rockcls ensemble --runs ...``) repeats it in the run's description.

    The caller ends it (after registering the model, if asked).
    """
    run_id = tracking.start_run(experiment=experiment, name=fit.name, kind="ensemble",
                                parent_run_id=parent_run_id, adopt_env_run=parent_run_id is None,
                                tags={names.MEMBERS: ",".join(fit.run_ids), names.STRATEGY: fit.strategy,
                                      **fit.split, **(tags or {})})
    with tracking.closing(run_id, finish=False):  # the caller ends it
        default = f"python -m rockcls ensemble --runs {','.join(fit.run_ids)}"
        tracking.set_description(run_id, fit.describe(command or default))
        tracking.copy_dataset_inputs(fit.run_ids[0], run_id, context="evaluation")  # the members' OOF rows
        tracking.log_params(run_id, {"members": ",".join(fit.run_ids), "num_members": len(fit.run_ids),
                                     **(params or {})})
        tracking.log_metrics(run_id, {
            "ensemble_macro_f1": fit.crossfit_score, "insample_macro_f1": fit.insample_score,
            "equal_weight_macro_f1": fit.equal_weight_score, "best_member_macro_f1": fit.best_member_score,
            **{f"weight.{i}": float(w) for i, w in enumerate(fit.weights)},
            **{f"member_macro_f1.{i}": fit.member_scores[r] for i, r in enumerate(fit.run_ids)},
            **{f"bias.{safe_name(c)}": float(v) for c, v in zip(fit.classes, fit.bias)},
            **{f"ensemble_f1.{safe_name(c)}": v for c, v in fit.crossfit_per_class.items()}})
        tracking.log_dict(run_id, fit.to_dict(), names.ENSEMBLE_FILE)
        tracking.log_text(run_id, fit.score_table().to_csv(index=False), names.SCORES_FILE)
        tracking.log_figure(run_id, confusion_figure(fit.labels, fit.crossfit_preds, fit.classes,
                                                     f"cross-fitted macro-F1 {fit.crossfit_score:.4f}"),
                            names.CONFUSION_FIGURE)
    return run_id

