"""Face-verification metrics: the k-fold LFW protocol, AUC, TAR at a fixed FAR, ROC points.

Pure NumPy and no project imports: every verifier (eval/verification/sets.py, eval/ijb.py) and,
through its validation, the trainer use it. Thresholds are exact: every midpoint between
consecutive distinct scores is tried (the reference evaluator stepped through histogram bins
instead). A pair is predicted "same" when its score is strictly above the threshold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

FAR_TARGET = 1e-3


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The threshold that maximizes accuracy on these pairs, and that accuracy.

    Candidates: below every score, above every score, and each midpoint between consecutive
    distinct scores; O(n log n). Ties in accuracy go to the lowest threshold.
    """
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    if scores.size == 0:
        raise ValueError("best_threshold needs at least one pair")
    values, inverse = np.unique(scores, return_inverse=True)
    pos_at = np.bincount(inverse, weights=same, minlength=len(values))
    neg_at = np.bincount(inverse, weights=~same, minlength=len(values))
    # Cut i puts values[:i] below the threshold (predicted different), values[i:] above.
    neg_below = np.concatenate([[0.0], np.cumsum(neg_at)])
    pos_above = pos_at.sum() - np.concatenate([[0.0], np.cumsum(pos_at)])
    correct = neg_below + pos_above
    i = int(np.argmax(correct))
    if i == 0:
        thr = values[0] - 1.0
    elif i == len(values):
        thr = values[-1] + 1.0
    else:
        thr = (values[i - 1] + values[i]) / 2.0
    return float(thr), float(correct[i] / scores.size)


def auc_score(scores: np.ndarray, same: np.ndarray) -> float:
    """Area under the ROC curve by the rank (Mann-Whitney) statistic, ties counted as half."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over runs of equal scores.
    starts = np.flatnonzero(np.concatenate([[True], sorted_scores[1:] != sorted_scores[:-1]]))
    ends = np.concatenate([starts[1:], [scores.size]])
    avg = (starts + ends + 1) / 2.0  # 1-based mean rank of each run
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[same].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float = FAR_TARGET) -> tuple[float, float]:
    """(TAR, threshold) with at most floor(far * negatives) negative pairs above the threshold.

    With 3,000 negative pairs and far=1e-3 that is 3 pairs: the threshold is the 4th highest
    negative score and a positive pair is accepted when strictly above it.
    """
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    neg = np.sort(scores[~same])[::-1]
    pos = scores[same]
    if neg.size == 0 or pos.size == 0:
        return float("nan"), float("nan")
    allowed = int(np.floor(far * neg.size + 1e-9))
    thr = float(neg[allowed]) if allowed < neg.size else float(neg[-1]) - 1.0
    return float(np.mean(pos > thr)), thr


def roc_curve(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FAR, TAR, thresholds) at every distinct score, thresholds descending, "same" when score >= thr."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], same[order]
    last_of_run = np.concatenate([s[1:] != s[:-1], [True]])
    tp = np.cumsum(y)[last_of_run]
    fp = np.cumsum(~y)[last_of_run]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    far = np.concatenate([[0.0], fp / n_neg])
    tar = np.concatenate([[0.0], tp / n_pos])
    thr = np.concatenate([[np.inf], s[last_of_run]])
    return far, tar, thr


@dataclass
class KFoldResult:
    """Per-fold thresholds and accuracies, and each pair's prediction from its held-out fold."""

    fold_ids: np.ndarray
    thresholds: np.ndarray
    accuracies: np.ndarray
    predicted_same: np.ndarray


def kfold(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> KFoldResult:
    """For each fold, fit the best threshold on all the other folds and apply it to this one."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    folds = np.asarray(folds)
    if not (scores.shape == same.shape == folds.shape) or scores.ndim != 1:
        raise ValueError(
            f"scores, same, folds must be 1-D of one length, got {scores.shape}, {same.shape}, {folds.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinity")
    fold_ids = np.unique(folds)
    if fold_ids.size < 2:
        raise ValueError(f"the k-fold protocol needs at least 2 folds, got {fold_ids.size}")
    thresholds, accuracies = [], []
    predicted = np.zeros(scores.size, dtype=bool)
    for f in fold_ids:
        test = folds == f
        thr, _ = best_threshold(scores[~test], same[~test])
        pred = scores[test] > thr
        predicted[test] = pred
        thresholds.append(thr)
        accuracies.append(float(np.mean(pred == same[test])))
    return KFoldResult(fold_ids, np.array(thresholds), np.array(accuracies), predicted)


def verification_metrics(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    """The Metrics JSON keys of docs/CONTRACTS.md except "seconds".

    accuracy_mean/std over the folds (population std, as the reference); same_accuracy and
    diff_accuracy over all pairs, each scored with its held-out fold's threshold; threshold is the
    mean of the fold thresholds; auc and tar_at_far_1e-3 over all pairs.
    """
    res = kfold(scores, same, folds)
    same = np.asarray(same, dtype=bool)
    correct = res.predicted_same == same
    tar, _ = tar_at_far(scores, same, FAR_TARGET)
    return {
        "accuracy_mean": float(res.accuracies.mean()),
        "accuracy_std": float(res.accuracies.std()),
        "same_accuracy": float(correct[same].mean()) if same.any() else float("nan"),
        "diff_accuracy": float(correct[~same].mean()) if (~same).any() else float("nan"),
        "auc": auc_score(scores, same),
        "threshold": float(res.thresholds.mean()),
        "tar_at_far_1e-3": tar,
        "num_pairs": int(np.asarray(scores).size),
    }


def _field(pair: Any, name: str) -> Any:
    return pair[name] if isinstance(pair, Mapping) else getattr(pair, name)


class NonFiniteEmbeddings(ValueError):
    """Some embeddings hold NaN or infinity (a diverged model): no score of them means anything."""


def check_finite(embeddings: np.ndarray, index_of: Mapping[str, int]) -> None:
    """Raise NonFiniteEmbeddings saying how many rows are bad and naming the first one's key.

    Checked before any score: a NaN embedding would otherwise score NaN, or 0 after a guarded
    normalization, and the protocol would report chance accuracy as a result.
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (faces x dims), got shape {emb.shape}")
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size == 0:
        return
    key_of = {row: key for key, row in index_of.items()}
    first = key_of.get(int(bad[0]), f"row {int(bad[0])}")
    raise NonFiniteEmbeddings(
        f"{bad.size} of {emb.shape[0]} embeddings are NaN or infinite (first: {first!r})"
    )


def pair_scores(
    embeddings: np.ndarray, index_of: Mapping[str, int], pairs: Iterable[Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine similarity of each pair's two embeddings; pairs have a, b, same, fold (objects or dicts).

    Raises KeyError naming the first pair key that has no embedding, and NonFiniteEmbeddings
    (check_finite) when any embedding is not finite.
    """
    check_finite(embeddings, index_of)
    emb = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.maximum(norms, 1e-12)
    a, b, same, folds = [], [], [], []
    for p in pairs:
        for key in (_field(p, "a"), _field(p, "b")):
            if key not in index_of:
                raise KeyError(f"pair key {key!r} has no embedding")
        a.append(index_of[_field(p, "a")])
        b.append(index_of[_field(p, "b")])
        same.append(bool(_field(p, "same")))
        folds.append(int(_field(p, "fold")))
    ia, ib = np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)
    scores = np.einsum("ij,ij->i", emb[ia], emb[ib]) if ia.size else np.zeros(0)
    return scores, np.array(same, dtype=bool), np.array(folds, dtype=np.int64)
