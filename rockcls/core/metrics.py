"""Classification metrics (scikit-learn) and the confusion-matrix figure."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score


def macro_f1(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    return float(f1_score(labels, preds, labels=list(range(num_classes)), average="macro", zero_division=0))


def per_class_f1(labels: np.ndarray, preds: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    scores = f1_score(labels, preds, labels=list(range(len(classes))), average=None, zero_division=0)
    return {name: float(s) for name, s in zip(classes, scores)}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion_figure(labels: np.ndarray, preds: np.ndarray, classes: Sequence[str], title: str = ""):
    """Row-normalised confusion matrix with counts, as a matplotlib figure (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion_matrix(labels, preds, labels=list(range(len(classes))))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = 2.0 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def safe_name(name: str) -> str:
    """A class name as part of a metric key (``val_f1.<class>``): MLflow accepts letters, digits
    and ``_-./`` and spaces only."""
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in name)
