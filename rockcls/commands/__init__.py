"""The command lines on top: train, distill, predict, evaluate, ensemble, prepare, demo, and the `python -m rockcls` dispatcher (cli)."""
