"""rockcls: k-fold image classification with timm, tracked in MLflow, searched with Optuna."""

__version__ = "0.1.0"
