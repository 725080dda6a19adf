"""The weight search of soft voting: coordinate ascent on macro-F1 over simplex weights and a
per-class bias, and the groups it is cross-fitted over (`rockcls.runs.ensemble` chooses among
the candidates it fits)."""

from __future__ import annotations

import numpy as np

from rockcls.core.errors import RockclsError

WEIGHT_GRID = np.linspace(0.0, 1.0, 11)


BIAS_STEPS = 33


EPS = 1e-12


def fast_macro_f1(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Macro-F1 over all classes (0 for a class never seen nor predicted), like
    `rockcls.core.metrics.macro_f1` but from one bincount: the search calls it thousands of times."""
    cm = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    cm = cm.reshape(num_classes, num_classes)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)
    f1 = np.divide(2 * tp, denom, out=np.zeros(num_classes), where=denom > 0)
    return float(f1.mean())


def blend(probs: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Ensemble scores: log of the weighted mean probability plus the per-class bias."""
    return np.log(np.tensordot(weights, probs, axes=1) + EPS) + bias[None, :]


def _with_weight(w: np.ndarray, m: int, t: float) -> np.ndarray:
    """``w`` with member ``m`` set to ``t`` and the others rescaled to keep the sum at 1."""
    out, others = w.copy(), np.arange(len(w)) != m
    rest = w[others].sum()
    out[others] = w[others] * (1 - t) / rest if rest > 0 else (1 - t) / others.sum()
    out[m] = t
    return out


def _best_on_grid(score, current: float, grid: np.ndarray) -> tuple[float, float]:
    """Best grid value for one coordinate; ties go to the value nearest the current one."""
    order = sorted(np.asarray(grid, dtype=np.float64), key=lambda g: abs(g - current))
    scores = [score(g) for g in order]
    k = int(np.argmax(scores))
    return float(order[k]), float(scores[k])


def _bias_line(base: np.ndarray, b: np.ndarray, c: int, labels: np.ndarray, steps: int):
    """Candidates and scorer for class ``c``'s bias, the others fixed.

    Row i switches to class c exactly when the bias exceeds ``t_i`` (best other score minus its
    class-c score), so candidates are quantiles of ``t``: the grid adapts to the logit scale.
    """
    scores = base + b[None, :]
    others = np.delete(scores, c, axis=1)
    other_best = others.max(1)
    other_idx = np.delete(np.arange(len(b)), c)[others.argmax(1)]
    t = other_best - base[:, c]
    grid = np.unique(np.concatenate([np.quantile(t, np.linspace(0.0, 1.0, steps)) + 1e-6, [b[c]]]))

    def score(g: float) -> float:
        preds = np.where(base[:, c] + g > other_best, c, other_idx)
        return fast_macro_f1(labels, preds, len(b))
    return grid, score


def fit_weights(probs: np.ndarray, labels: np.ndarray, *, bias: bool = True, rounds: int = 4,
                weight_grid: np.ndarray = WEIGHT_GRID, bias_steps: int = BIAS_STEPS
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """Coordinate ascent on macro-F1 over simplex weights (and per-class bias).

    ``probs``: (members, samples, classes). Returns (weights, bias, in-sample macro-F1).
    """
    n_members, _, num_classes = probs.shape
    w, b = np.full(n_members, 1.0 / n_members), np.zeros(num_classes)

    def f1(w_: np.ndarray, b_: np.ndarray) -> float:
        return fast_macro_f1(labels, blend(probs, w_, b_).argmax(1), num_classes)

    best = f1(w, b)
    for _ in range(rounds):
        start = best
        for m in range(n_members if n_members > 1 else 0):
            t, s = _best_on_grid(lambda g: f1(_with_weight(w, m, g), b), w[m], weight_grid)
            if s > best:
                w, best = _with_weight(w, m, t), s
        if bias:
            base = np.log(np.tensordot(w, probs, axes=1) + EPS)
            for c in range(num_classes):
                grid, score = _bias_line(base, b, c, labels, bias_steps)
                v, s = _best_on_grid(score, b[c], grid)
                if s > best:
                    b[c], best = v, s
        if best <= start:
            break
    return w, b, f1(w, b)


def crossfit_groups(fold: np.ndarray, labels: np.ndarray, *, seed: int, max_groups: int = 5) -> np.ndarray:
    """Groups to cross-fit over: the CV folds, or (one holdout) a seeded stratified partition of it."""
    if len(np.unique(fold)) >= 2:
        return np.asarray(fold)
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(labels)
    k = int(min(max_groups, counts[counts > 0].min()))
    if k >= 2:
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(labels, labels)
    else:
        k = min(max_groups, len(labels))
        if k < 2:
            raise RockclsError("ensemble: fewer than 2 scored OOF rows; cannot cross-fit")
        splits = KFold(n_splits=k, shuffle=True, random_state=seed).split(labels)
    groups = np.zeros(len(labels), dtype=np.int64)
    for g, (_, held) in enumerate(splits):
        groups[held] = g
    return groups
