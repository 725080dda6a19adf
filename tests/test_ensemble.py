"""Tests for rockcls.runs.ensemble and the ensemble command: macro-F1 weight/bias search, cross-fitting, members, the command."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from rockcls.commands import ensemble as ensemble_cmd
from rockcls.core import errors as ensemble_errors
from rockcls.core.errors import RockclsError
from rockcls.core.metrics import macro_f1
from rockcls.runs import ensemble, voting

CLASSES = ["a", "b", "c", "d"]


def _labels(n: int, seed: int) -> np.ndarray:
    """Imbalanced labels: 50/25/15/10 %."""
    return np.random.default_rng(seed).choice(4, size=n, p=[0.5, 0.25, 0.15, 0.1])


def _member(name: str, labels: np.ndarray, logits: np.ndarray, fold: np.ndarray) -> ensemble.Member:
    return ensemble.Member(name, name, np.asarray([f"id{i}" for i in range(len(labels))]), labels, fold,
                           logits.astype(np.float32), CLASSES, {"rockcls.split_fingerprint": "s"})


def _oof_members(n: int = 600, seed: int = 0) -> list[ensemble.Member]:
    """A good member (strong signal), a weak one, and one of pure noise; 5 CV folds."""
    rng = np.random.default_rng(seed)
    labels = _labels(n, seed)
    onehot = np.eye(4)[labels]
    fold = np.arange(n) % 5
    good = 2.0 * onehot + rng.normal(0, 1.0, (n, 4))
    weak = 0.7 * onehot + rng.normal(0, 1.0, (n, 4))
    noise = rng.normal(0, 1.0, (n, 4))
    return [_member("good", labels, good, fold), _member("weak", labels, weak, fold),
            _member("noise", labels, noise, fold)]


# ---- the search -----------------------------------------------------------------------


def test_fast_macro_f1_matches_sklearn() -> None:
    rng = np.random.default_rng(1)
    for n, k in ((50, 3), (500, 7), (20, 6)):
        labels, preds = rng.integers(0, k, n), rng.integers(0, k - 1, n)  # one class never predicted
        assert voting.fast_macro_f1(labels, preds, k) == pytest.approx(macro_f1(labels, preds, k), abs=1e-12)


def test_weight_search_beats_or_ties_equal_weights_and_favours_the_better_member() -> None:
    members = _oof_members()
    probs = np.stack([np.exp(m.logits) / np.exp(m.logits).sum(1, keepdims=True) for m in members])
    labels = members[0].labels
    equal = voting.fast_macro_f1(labels, voting.blend(probs, np.full(3, 1 / 3), np.zeros(4)).argmax(1), 4)
    weights, bias, score = voting.fit_weights(probs, labels, bias=False)
    assert score >= equal
    assert weights.sum() == pytest.approx(1.0) and (weights >= 0).all()
    assert weights[0] > weights[1] >= weights[2]
    assert (bias == 0).all()
    assert score == pytest.approx(voting.fast_macro_f1(labels, voting.blend(probs, weights, bias).argmax(1), 4))


def test_weight_search_never_loses_to_equal_weights_on_random_members() -> None:
    for seed in range(5):
        rng = np.random.default_rng(seed)
        labels = _labels(120, seed)
        probs = rng.dirichlet(np.ones(4), size=(3, 120))
        equal = voting.fast_macro_f1(labels, voting.blend(probs, np.full(3, 1 / 3), np.zeros(4)).argmax(1), 4)
        assert voting.fit_weights(probs, labels)[2] >= equal


def test_bias_search_corrects_a_member_that_under_predicts_a_rare_class() -> None:
    rng = np.random.default_rng(2)
    labels = _labels(1000, 2)
    logits = 1.5 * np.eye(4)[labels] + rng.normal(0, 1.0, (1000, 4))
    logits[:, 3] -= 1.5  # the rarest class is systematically under-scored
    fold = np.arange(1000) % 5
    without = ensemble.fit_ensemble([_member("m", labels, logits, fold)], bias=False)
    with_bias = ensemble.fit_ensemble([_member("m", labels, logits, fold)], bias=True)
    assert with_bias.bias[3] - with_bias.bias[:3].mean() > 0.5
    assert with_bias.crossfit_score > without.crossfit_score + 0.02  # a real shift: it generalises


def test_fit_ensemble_reports_members_equal_weights_in_sample_and_cross_fitted_scores() -> None:
    members = _oof_members()
    fit = ensemble.fit_ensemble(members, bias=True)
    labels = members[0].labels
    assert fit.member_scores["good"] == pytest.approx(macro_f1(labels, members[0].logits.argmax(1), 4))
    assert fit.insample_score >= fit.equal_weight_score
    assert fit.num_groups == 5
    # the honest estimate: every row predicted by weights fitted without its fold
    assert fit.crossfit_score == pytest.approx(macro_f1(labels, fit.crossfit_preds, 4))
    assert fit.crossfit_score > fit.member_scores["weak"]
    table = fit.score_table()
    assert list(table["estimate"])[-2:] == ["in-sample (optimistic)", "honest"]
    fitted = [fit.candidates["fitted weights"], fit.candidates["fitted weights + bias"]]
    assert list(table["macro_f1"]) == pytest.approx([*fit.member_scores.values(), fit.equal_weight_score,
                                                     *fitted, fit.insample_score, fit.crossfit_score])
    assert fit.crossfit_score == max(fit.candidates.values())
    assert fit.candidates[fit.strategy] == fit.crossfit_score


@pytest.mark.parametrize("seed", range(6))
def test_chosen_ensemble_never_scores_below_equal_weights_or_its_best_member(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = _labels(300, seed)
    fold = np.arange(300) % 3
    strength = rng.uniform(0.0, 1.5, 3)
    members = [_member(f"m{i}", labels, s * np.eye(4)[labels] + rng.normal(0, 1, (300, 4)), fold)
               for i, s in enumerate(strength)]
    fit = ensemble.fit_ensemble(members, bias=True)
    assert fit.score >= fit.equal_weight_score
    assert fit.score >= fit.best_member_score
    assert fit.weights.sum() == pytest.approx(1.0)


def test_a_fitted_rule_is_chosen_only_when_it_wins_on_held_out_folds() -> None:
    rng = np.random.default_rng(8)
    labels = _labels(200, 8)
    fold = np.arange(200) % 4
    members = [_member(f"n{i}", labels, rng.normal(0, 1, (200, 4)), fold) for i in range(3)]
    fit = ensemble.fit_ensemble(members, bias=True)  # pure noise: fitting cannot generalise
    assert fit.insample_score > max(fit.candidates["fitted weights"], fit.candidates["fitted weights + bias"])
    if fit.strategy.startswith("fitted"):
        assert fit.score > max(fit.equal_weight_score, fit.best_member_score)
    shifted = _labels(1000, 2)
    logits = 1.5 * np.eye(4)[shifted] + rng.normal(0, 1.0, (1000, 4))
    logits[:, 3] -= 1.5  # a systematic under-score of one class: a bias that generalises
    fit = ensemble.fit_ensemble([_member("m", shifted, logits, np.arange(1000) % 5)], bias=True)
    assert fit.strategy == "fitted weights + bias"
    assert fit.score > fit.equal_weight_score + 0.02


def test_cross_fitted_score_is_not_optimistic_on_pure_noise() -> None:
    rng = np.random.default_rng(4)
    labels = _labels(200, 4)
    fold = np.arange(200) % 4
    members = [_member(f"n{i}", labels, rng.normal(0, 1, (200, 4)), fold) for i in range(3)]
    fit = ensemble.fit_ensemble(members, bias=True)
    # the search overfits noise in-sample; its cross-fitted score shows it
    assert fit.insample_score > fit.candidates["fitted weights + bias"] + 0.03
    assert fit.crossfit_score < 0.35  # chance level for 4 classes is about 0.25


def test_single_holdout_cross_fits_over_a_seeded_internal_partition() -> None:
    rng = np.random.default_rng(5)
    labels = _labels(400, 5)
    fold = np.where(rng.random(400) < 0.3, 0, -1)  # folds=1: 0 = holdout, -1 = train-only
    logits = 1.5 * np.eye(4)[labels] + rng.normal(0, 1, (400, 4))
    logits[fold < 0] = np.nan
    members = [_member("m", labels, logits, fold)]
    fit = ensemble.fit_ensemble(members, seed=3)
    assert len(fit.labels) == (fold == 0).sum()
    assert fit.num_groups >= 2
    assert ensemble.fit_ensemble(members, seed=3).crossfit_score == fit.crossfit_score
    groups = voting.crossfit_groups(fold[fold == 0], labels[fold == 0], seed=3)
    assert set(np.unique(groups)) == set(range(fit.num_groups))
    for g in range(fit.num_groups):  # stratified: every class present in every group
        assert set(labels[fold == 0][groups == g]) == set(labels[fold == 0])


def test_crossfit_groups_are_the_cv_folds_when_there_are_several() -> None:
    fold = np.array([0, 1, 2, 0, 1, 2])
    assert voting.crossfit_groups(fold, np.zeros(6, dtype=int), seed=0).tolist() == fold.tolist()


# ---- members from MLflow runs ----------------------------------------------------------




@pytest.fixture
def runs(split_runs, open_store):
    """Two runs on the same split (lr and the training seed differ) and one with another split_seed,
    trained once per session (tests/conftest.py); the ensembles made here are logged beside them."""
    open_store(split_runs)
    return tuple(r.run_id for r in split_runs.results)


def test_members_with_another_split_are_refused_naming_the_mismatch(runs) -> None:
    a, _, c = runs
    with pytest.raises(RockclsError, match=rf"run {c} does not share the split of run {a} \(.*split seed 7 != 42; "
                                           r"split fingerprint \w+ != \w+\)"):
        ensemble.load_members([a, c])


def test_members_on_the_same_split_load_with_their_oof_logits(runs) -> None:
    a, b, _ = runs
    members = ensemble.load_members([a, b])
    assert [m.run_id for m in members] == [a, b]
    assert members[0].logits.shape == (72, 3) and np.isfinite(members[0].logits).all()
    assert np.array_equal(members[0].fold, members[1].fold)


def test_duplicate_or_non_train_members_are_refused(runs) -> None:
    a, _, _ = runs
    with pytest.raises(ensemble_errors.ConfigError, match=f"runs: run {a} given more than once"):
        ensemble.load_members([a, a])
    fold_run = MlflowClient().search_runs([MlflowClient().get_run(a).info.experiment_id],
                                          filter_string=f"tags.`mlflow.parentRunId` = '{a}'")[0].info.run_id
    with pytest.raises(RockclsError, match=f"run {fold_run} is a fold run, not a train run"):
        ensemble.load_members([a, fold_run])


def test_top_runs_rank_completed_train_runs_of_the_best_split(runs) -> None:
    client = MlflowClient()
    top = ensemble.top_runs("rockcls", 3)
    scores = [client.get_run(r).data.metrics["cv_macro_f1"] for r in top]
    assert scores == sorted(scores, reverse=True)
    splits = {client.get_run(r).data.tags["rockcls.split_fingerprint"] for r in top}
    assert len(splits) == 1
    all_same_split = [r for r in runs if client.get_run(r).data.tags["rockcls.split_fingerprint"] in splits]
    assert sorted(top) == sorted(all_same_split)
    assert len(ensemble.top_runs("rockcls", 3, same_split=False)) == 3
    assert len(ensemble.top_runs("rockcls", 1)) == 1
    with pytest.raises(RockclsError, match="no completed trial run"):
        ensemble.top_runs("rockcls", 3, kind="trial")


def test_ensemble_command_logs_weights_bias_scores_and_confusion_matrix(runs, capsys) -> None:
    a, b, _ = runs
    assert ensemble_cmd.main(["--runs", f"{a}, {b}", "--bias", "true", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "cross-fitted over 2 groups" in out and "equal weights" in out and "honest" in out
    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("rockcls").experiment_id],
                             filter_string="tags.`rockcls.kind` = 'ensemble'")[0]
    assert run.info.status == "FINISHED" and run.data.tags["rockcls.members"] == f"{a},{b}"
    # tta auto: the views the members' OOF logits (and so the honest score) were made with
    assert run.data.params["tta"] == client.get_run(a).data.params["tta"]
    metrics = run.data.metrics
    for key in ("ensemble_macro_f1", "insample_macro_f1", "equal_weight_macro_f1", "weight.0", "weight.1",
                "member_macro_f1.0", "member_macro_f1.1", "best_member_macro_f1"):
        assert key in metrics
    assert metrics["ensemble_macro_f1"] >= max(metrics["equal_weight_macro_f1"], metrics["best_member_macro_f1"])
    assert metrics["weight.0"] + metrics["weight.1"] == pytest.approx(1.0)
    assert metrics["insample_macro_f1"] >= metrics["equal_weight_macro_f1"]
    assert metrics["member_macro_f1.0"] == pytest.approx(client.get_run(a).data.metrics["cv_macro_f1"])
    artifacts = {x.path for x in client.list_artifacts(run.info.run_id)}
    assert {"ensemble.json", "scores.csv", "confusion_matrix.png"} <= artifacts
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="ensemble.json")
    saved = json.loads(open(path).read())
    assert [m["run_id"] for m in saved["members"]] == [a, b] and set(saved["bias"]) == set(saved["classes"])
    assert saved["scores"]["crossfit_macro_f1"] == pytest.approx(metrics["ensemble_macro_f1"])


def test_members_tta_is_their_common_views_else_none() -> None:
    members = _oof_members()
    for m in members:
        m.tta = "d4"
    assert ensemble.members_tta(members) == "d4"
    members[0].tta = "flip"
    assert ensemble.members_tta(members) == "none"


def test_ensemble_command_refuses_a_mixed_split(runs) -> None:
    a, _, c = runs
    with pytest.raises(RockclsError, match="does not share the split"):
        ensemble_cmd.main(["--runs", f"{a},{c}"])
