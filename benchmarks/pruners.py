"""Pruners compared on one Optuna study: epochs spent, wall time and the best CV macro-F1 reached.

Usage: python benchmarks/pruners.py DATA [--root /tmp/bench-pruners] [--mode replay|studies]
       [--pruners none,median,hyperband,wilcoxon] [--trials 12] [--partial] [-- TRAIN/TUNE FLAGS ...]

``--mode studies``: each pruner runs its own ``search/tune.py`` study (own MLflow store and
Optuna storage under ``ROOT/<pruner>``, shared decoded-image cache ``ROOT/cache``) with the same
study name, sampler seed (the train ``--seed``) and ``--trials``, and no ensemble. Faithful, but
it trains every pruner's trials.

``--mode replay`` (default, for a small CPU): one study without pruning (``ROOT/none``) records
every epoch's validation macro-F1 of every trial; then each pruner, the real Optuna pruner that
``--pruner`` builds fed by the real hooks of ``rockcls.search.trial``, decides on those curves
for the same trial sequence (a fold's score for wilcoxon is its kept epoch's value: with the cheap
setting's ``--tta none`` and no EMA that is exactly the fold's OOF macro-F1). A trial's epochs do not depend on later ones (each epoch is seeded by
(seed, fold, epoch)), so a pruned trial's curve is exactly its prefix in the recorded one; what
replay leaves out is the sampler's reaction to pruned trials (TPE would then suggest other
parameters). Wall time is the recorded trials' seconds per epoch times the epochs a pruner spends
(no study set-up); ``--partial`` replays what an unfinished ``ROOT/none`` study holds so far.

The flags after ``--`` go to every tune command; the defaults are a cheap CPU setting (resnet10t
from scratch, 64 px, 3 folds x 3 epochs, tta none). A study that already finished under ROOT is
not run again, so an interrupted benchmark continues where it stopped.

Prints a table and ``<pruner>_epochs N``, ``<pruner>_best N``, ``<pruner>_seconds N`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from rockcls.search.bookkeeping import epochs_run  # noqa: E402
from rockcls.search.pruning import build_pruner  # noqa: E402
from rockcls.search.space import StudyPlan, TuneConfig, quiet_optuna  # noqa: E402
from rockcls.search.tickets import FINISHED  # noqa: E402
from rockcls.search.trial import PrunedTrial, build_hooks  # noqa: E402

CHEAP = ["--backbone", "resnet10t", "--pretrained", "false", "--img-size", "64", "--folds", "3", "--epochs", "3",
         "--batch-size", "32", "--num-workers", "0", "--tta", "none", "--device", "cpu"]
STUDY = "pruners"


def run_study(pruner: str, args: argparse.Namespace, extra: list[str]) -> tuple[optuna.Study, float]:
    """``search/tune.py`` under ``pruner`` (skipped when its study already finished); its study and seconds."""
    where = Path(args.root) / pruner
    storage = f"sqlite:///{where / 'optuna.db'}"
    timing = where / "seconds.json"
    if timing.is_file():
        return optuna.load_study(study_name=STUDY, storage=storage), json.loads(timing.read_text())["seconds"]
    where.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "search" / "tune.py"), "--data", str(Path(args.data).resolve()),
           "--trials", str(args.trials), "--pruner", pruner, "--study-name", STUDY, "--storage", storage,
           "--top-k", "0", *CHEAP, *extra]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{where / 'mlflow.db'}",
           "ROCKCLS_CACHE_DIR": str(Path(args.root) / "cache")}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    print(f"[{pruner}] {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(where / "tune.log", "a") as log:
        code = subprocess.run(cmd, cwd=where, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name=STUDY, storage=storage)
    finished = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    if code == 0 and finished == args.trials:
        timing.write_text(json.dumps({"seconds": seconds}))
    else:
        print(f"[{pruner}] tune exited {code} with {finished} of {args.trials} trials finished "
              f"(see {where / 'tune.log'}); re-run to continue", flush=True)
    return study, seconds


def row_of(pruner: str, trials: list, seconds: float) -> dict:
    """``trials``: (state, epochs, value) of each finished trial, in order."""
    complete = [(i, v) for i, (s, _, v) in enumerate(trials) if s == TrialState.COMPLETE]
    best = max(complete, key=lambda c: c[1]) if complete else (None, None)
    return {"pruner": pruner, "complete": len(complete),
            "pruned": sum(s == TrialState.PRUNED for s, _, _ in trials),
            "epochs": sum(e for _, e, _ in trials), "best_trial": best[0], "best": best[1], "seconds": seconds}


def studies(args: argparse.Namespace, extra: list[str]) -> list[dict]:
    rows = []
    for pruner in args.pruners:
        study, seconds = run_study(pruner, args, extra)
        trials = [(t.state, epochs_run(t), t.value) for t in study.get_trials(deepcopy=False) if t.state in FINISHED]
        rows.append(row_of(pruner, trials, seconds))
    return rows


def replay(args: argparse.Namespace, extra: list[str]) -> list[dict]:
    if args.partial:
        storage = f"sqlite:///{Path(args.root) / 'none' / 'optuna.db'}"
        recorded = optuna.load_study(study_name=STUDY, storage=storage)
    else:
        recorded, _ = run_study("none", args, extra)
    plan = tune_plan(args.root)
    done = [t for t in recorded.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(done) < args.trials:
        print(f"replaying the {len(done)} complete trials of {args.trials}", flush=True)
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    per_epoch = seconds / max(sum(epochs_run(t) for t in done), 1)
    rows = []
    for pruner in args.pruners:
        trials = replay_pruner(pruner, plan, done)
        rows.append(row_of(pruner, trials, per_epoch * sum(e for _, e, _ in trials)))
    return rows


def tune_plan(root: str) -> StudyPlan:
    """The recorded study's plan, from the study.yaml its MLflow run holds (folds, epochs, select, tune)."""
    import yaml

    from rockcls.core.config import TrainConfig, build_config

    found = sorted(Path(root, "none").glob("mlruns/*/*/artifacts/study.yaml"))
    saved = yaml.safe_load(found[0].read_text())
    fixed = saved["identity"]["fixed"]
    base = build_config(TrainConfig, {k: v for k, v in fixed.items() if k in {"folds", "epochs", "select"}})
    tune = build_config(TuneConfig, {k: v for k, v in saved["tune"].items() if k != "storage"})
    return StudyPlan(base, tune, [], STUDY, "")


def replay_pruner(pruner: str, plan: StudyPlan, recorded: list) -> list:
    """Each recorded trial, in order, under ``pruner``: (state, epochs spent, value if complete)."""
    import dataclasses

    plan = dataclasses.replace(plan, tune=dataclasses.replace(plan.tune, pruner=pruner))
    # named as the recorded study: Hyperband picks a trial's bracket from a hash of study name and number
    study = optuna.create_study(study_name=STUDY, direction="maximize", pruner=build_pruner(plan.tune, plan.steps))
    epochs, out = plan.base.epochs, []
    for rec in recorded:
        trial = study.ask(fixed_distributions=rec.distributions)
        on_epoch_end, on_fold_end = build_hooks(trial, plan, study_run_id="")
        on_epoch_end.run_id = ""  # nothing to log: no MLflow run behind a replayed trial
        try:
            for fold in range(plan.base.folds):
                curve = [rec.intermediate_values[s] for s in sorted(rec.intermediate_values) if s // epochs == fold]
                for epoch, value in enumerate(curve):
                    on_epoch_end(fold, epoch, {"val_macro_f1": value})
                if on_fold_end is not None and curve:
                    on_fold_end(fold, max(curve) if plan.base.select == "best" else curve[-1])
        except PrunedTrial:
            study.tell(trial, state=TrialState.PRUNED)
            out.append((TrialState.PRUNED, on_epoch_end.epochs_run, None))
            continue
        study.tell(trial, rec.value)
        out.append((TrialState.COMPLETE, on_epoch_end.epochs_run, rec.value))
    return out


def print_table(rows: list[dict], steps: int, trials: int) -> None:
    print(f"\n| pruner | trials complete / pruned | epochs spent (of {steps * trials}) | best CV macro-F1 "
          f"(trial) | wall time |")
    print("|---|---|---|---|---|")
    for r in rows:
        best = f"{r['best']:.4f} ({r['best_trial']})" if r["best"] is not None else "-"
        print(f"| {r['pruner']} | {r['complete']} / {r['pruned']} | {r['epochs']} | {best} | "
              f"{r['seconds'] / 60:.1f} min |")
    print()
    for r in rows:
        print(f"{r['pruner']}_epochs {r['epochs']}")
        print(f"{r['pruner']}_best {r['best'] if r['best'] is not None else 'nan'}")
        print(f"{r['pruner']}_seconds {r['seconds']:.0f}")


def flag_value(argv: list[str], flag: str, default: str) -> str:
    """The last value of ``flag`` in ``argv`` (what the tune parser keeps), else ``default``."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]
    return values[-1] if values else default


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--root", default="/tmp/bench-pruners")
    parser.add_argument("--mode", choices=("replay", "studies"), default="replay")
    parser.add_argument("--pruners", default="none,median,hyperband,wilcoxon")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--partial", action="store_true",
                        help="replay: the trials ROOT/none holds so far, without running or resuming its study")
    args = parser.parse_args(own)
    args.pruners = [p.strip() for p in args.pruners.split(",") if p.strip()]
    quiet_optuna()
    rows = replay(args, extra) if args.mode == "replay" else studies(args, extra)
    full = [*CHEAP, *extra]
    steps = int(flag_value(full, "--folds", "3")) * int(flag_value(full, "--epochs", "3"))
    print_table(rows, steps, args.trials)
    return 0


if __name__ == "__main__":
    sys.exit(main())
