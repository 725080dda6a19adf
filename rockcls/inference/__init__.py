"""Prediction from fold checkpoints with test-time views (predictor). Imports core, data and training."""
