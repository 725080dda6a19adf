"""Prediction from fold checkpoints with test-time views (predictor), and what a served model accepts from a request and what one request may cost (serving). Imports core, data and training."""
