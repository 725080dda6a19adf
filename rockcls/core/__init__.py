"""The bottom layer: errors, typed config, secrets masking, logging and progress, metrics, and the thin MLflow wrapper every layer above logs through. Imports nothing else of rockcls."""
