"""The command lines on top: train, predict, ensemble, prepare, demo, and the `python -m rockcls` dispatcher (cli)."""
