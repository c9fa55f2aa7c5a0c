"""Known answers for eval/verification/metrics.py: the metric code of every verifier and the trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eval.verification import metrics as V
from eval.verification.metrics import (
    auc_score,
    best_threshold,
    kfold,
    pair_scores,
    roc_curve,
    tar_at_far,
    verification_metrics,
)
from tests._eval_util import METRIC_KEYS as CONTRACT_KEYS

METRIC_KEYS = CONTRACT_KEYS - {"seconds"}  # verification_metrics leaves the timing to its caller


def _lfw_like(n_per_fold: int = 60, folds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    same = np.tile(np.r_[np.ones(n_per_fold // 2, bool), np.zeros(n_per_fold // 2, bool)], folds)
    fold = np.repeat(np.arange(folds), n_per_fold)
    return same, fold


def test_separable_embeddings_score_perfectly() -> None:
    rng = np.random.default_rng(0)
    n_id, dim = 40, 16
    centers = rng.normal(size=(n_id, dim))
    emb = np.repeat(centers, 2, axis=0) + 0.01 * rng.normal(size=(2 * n_id, dim))
    index_of = {f"k{i}": i for i in range(2 * n_id)}
    pairs = []
    for i in range(n_id):
        pairs.append({"a": f"k{2 * i}", "b": f"k{2 * i + 1}", "same": True, "fold": i % 10})
        j = (i + 1) % n_id
        pairs.append({"a": f"k{2 * i}", "b": f"k{2 * j}", "same": False, "fold": i % 10})
    scores, same, folds = pair_scores(emb, index_of, pairs)
    m = verification_metrics(scores, same, folds)
    assert set(m) == METRIC_KEYS
    assert m["accuracy_mean"] == 1.0 and m["accuracy_std"] == 0.0
    assert m["same_accuracy"] == 1.0 and m["diff_accuracy"] == 1.0
    assert m["auc"] == 1.0 and m["tar_at_far_1e-3"] == 1.0
    assert m["num_pairs"] == 2 * n_id
    assert scores[same].min() > m["threshold"] > scores[~same].max()
    json.dumps(m)  # plain Python numbers


def test_random_embeddings_score_near_chance() -> None:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(1200, 64))
    index_of = {str(i): i for i in range(1200)}
    same, fold = _lfw_like(60, 10)
    pairs = [
        {"a": str(2 * i), "b": str(2 * i + 1), "same": s, "fold": f}
        for i, (s, f) in enumerate(zip(same, fold, strict=True))
    ]
    m = verification_metrics(*pair_scores(emb, index_of, pairs))
    assert 0.4 < m["accuracy_mean"] < 0.6
    assert 0.4 < m["auc"] < 0.6
    assert m["tar_at_far_1e-3"] < 0.1


def test_hand_built_best_threshold() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.45, 0.5, 0.7, 0.8, 0.9])
    same = np.array([0, 0, 0, 1, 0, 1, 1, 1], bool)
    # Cuts at 0.375 (one error: 0.5) or 0.6 (one error: 0.45): equal accuracy, the lower one wins.
    thr, acc = best_threshold(scores, same)
    assert thr == pytest.approx(0.375) and acc == pytest.approx(7 / 8)
    # Separable with ties: cut exactly halfway between the two classes.
    thr, acc = best_threshold(np.array([0.2, 0.2, 0.6, 0.6]), np.array([0, 0, 1, 1], bool))
    assert thr == pytest.approx(0.4) and acc == 1.0
    # All one class: the threshold lies outside the scores.
    thr, acc = best_threshold(np.array([0.3, 0.5]), np.array([1, 1], bool))
    assert thr < 0.3 and acc == 1.0
    thr, acc = best_threshold(np.array([0.3, 0.5]), np.array([0, 0], bool))
    assert thr > 0.5 and acc == 1.0


def test_exact_threshold_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        n = int(rng.integers(5, 80))
        scores = np.round(rng.normal(size=n), 1)  # rounding makes ties
        same = rng.random(n) < 0.5
        _, acc = best_threshold(scores, same)
        cands = np.concatenate([[scores.min() - 1], scores])
        brute = max(np.mean((scores > t) == same) for t in cands)
        assert acc == pytest.approx(brute)


def test_auc_matches_pairwise_count() -> None:
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=300), 1)
    same = rng.random(300) < 0.4
    pos, neg = scores[same], scores[~same]
    brute = (np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])) / (
        pos.size * neg.size
    )
    assert auc_score(scores, same) == pytest.approx(brute)
    # ROC curve's trapezoid area is the same number.
    far, tar, _ = roc_curve(scores, same)
    assert np.trapezoid(tar, far) == pytest.approx(brute)
    assert far[0] == 0 and tar[0] == 0 and far[-1] == 1 and tar[-1] == 1


def test_tar_at_far_counts_allowed_negatives() -> None:
    # 3000 negatives: FAR 1e-3 allows exactly 3 above the threshold.
    neg = np.linspace(-0.5, 0.2, 3000)
    neg[-4] = 0.25
    neg[-3:] = [0.9, 0.95, 0.99]  # three impostors above every genuine pair but one
    pos = np.r_[np.linspace(0.3, 0.8, 2999), 0.995]  # all above 0.25
    scores = np.r_[pos, neg]
    same = np.r_[np.ones(3000, bool), np.zeros(3000, bool)]
    tar, thr = tar_at_far(scores, same, 1e-3)
    assert thr == pytest.approx(0.25)  # the 4th highest negative
    assert tar == 1.0
    # Allow only 2 impostors: the threshold moves up to 0.9 and only 0.995 passes.
    tar2, thr2 = tar_at_far(scores, same, 2 / 3000)
    assert thr2 == pytest.approx(0.9) and tar2 == pytest.approx(1 / 3000)


def test_thresholds_follow_the_pairs_folds_and_never_see_their_fold() -> None:
    same, fold = _lfw_like(20, 10)
    scores = np.where(same, 0.7, 0.3)
    # Fold 0's genuine pairs sit at 0.45: its own data would cut at 0.375, the other folds at 0.5.
    scores[(fold == 0) & same] = 0.45
    res = kfold(scores, same, fold)
    assert list(res.fold_ids) == list(range(10))
    assert res.accuracies[0] == 0.5  # its genuine pairs fall under the others' threshold
    assert res.thresholds[0] == pytest.approx(0.5)
    assert np.all(res.accuracies[1:] == 1.0)


def test_fold_split_uses_exactly_the_other_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    fold = rng.permutation(np.repeat([3, 7, 11, 20], 25))  # fold ids need not be 0..9 nor sorted
    scores = np.arange(100, dtype=np.float64)  # a score identifies its pair
    same = rng.random(100) < 0.5
    seen: list[set[int]] = []
    real = V.best_threshold

    def spy(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        seen.append({int(v) for v in s})
        return real(s, y)

    monkeypatch.setattr(V, "best_threshold", spy)
    res = kfold(scores, same, fold)
    assert list(res.fold_ids) == [3, 7, 11, 20]
    for f, trained_on in zip(res.fold_ids, seen, strict=True):
        assert trained_on == set(np.flatnonzero(fold != f).tolist())


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="at least 2 folds"):
        verification_metrics(np.zeros(4), np.array([1, 0, 1, 0], bool), np.zeros(4))
    with pytest.raises(ValueError, match="one length"):
        verification_metrics(np.zeros(4), np.zeros(3, bool), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        verification_metrics(np.array([np.nan, 0, 1, 2]), np.array([1, 0, 1, 0], bool), np.r_[0, 0, 1, 1])
    with pytest.raises(KeyError, match="nope"):
        pair_scores(np.eye(2), {"x": 0, "y": 1}, [{"a": "x", "b": "nope", "same": True, "fold": 0}])
