"""The one verification path: a set's pairs checked against its shards, then only the faces those pairs
use embedded and the pairs scored. eval/verify.py, eval/lfw.py and the trainer's validation all run it.

`prepare_set` resolves the pairs (the manifest's or a pairs file's, pairsets.py) against the sample
keys of the shards, so every mistake surfaces before anything is embedded; `evaluate_set` embeds the
faces the pairs use (embed_keys.py, the flip rule of eval/embed.py), scores each pair by cosine and
runs the k-fold protocol (metrics.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.cli import UserError
from eval.embed import EmbedFn
from eval.verification.embed_keys import embed_keys
from eval.verification.metrics import KFoldResult, kfold, pair_scores, verification_metrics
from eval.verification.pairsets import PairSet, set_pairs
from eval.verification.shard_faces import sample_table
from shards.manifest import Manifest
from shards.sample_index import SampleTable


@dataclass
class PreparedSet:
    """A set checked and ready to embed: its shards, where each face is, the pairs to score."""

    name: str
    manifest: Manifest
    table: SampleTable  # where each face is (with the keys)
    pairs: PairSet


@dataclass
class SetResult:
    name: str
    metrics: dict[str, Any]  # the Metrics JSON of docs/CONTRACTS.md plus folds and skips
    scores: np.ndarray
    same: np.ndarray
    folds: np.ndarray  # each pair's fold
    kfold: KFoldResult  # each fold's threshold and each pair's prediction


def prepare_set(
    name: str,
    manifest: Manifest,
    *,
    pairs_file: Path | None = None,
    folds: int | None = None,
    skip_missing: bool = False,
) -> PreparedSet:
    """Resolve a set's pairs against its shards; every mistake surfaces here, before any embedding."""
    table = sample_table(manifest)
    keys = set(table.keys or [])
    return PreparedSet(name, manifest, table, set_pairs(manifest, keys, pairs_file, folds, skip_missing))


def evaluate_set(
    embed: EmbedFn,
    ps: PreparedSet,
    *,
    batch_size: int = 32,
    flip: bool = True,
    parallel: int = 1,
    show_progress: bool = True,
) -> SetResult:
    """Embed the faces this set's pairs use and score them by the k-fold protocol. Raises
    metrics.NonFiniteEmbeddings when the model gives NaN or infinite embeddings."""
    start = time.perf_counter()
    pairs = ps.pairs.pairs
    keys = [k for p in pairs for k in (p.a, p.b)]
    emb, index_of = embed_keys(
        embed,
        ps.manifest,
        ps.table,
        keys,
        batch_size=batch_size,
        flip=flip,
        parallel=parallel,
        show_progress=show_progress,
        label=ps.name,
    )
    scores, same, fold_of = pair_scores(emb, index_of, pairs)
    try:
        metrics = verification_metrics(scores, same, fold_of)
        res = kfold(scores, same, fold_of)
    except ValueError as err:
        raise UserError(f"{ps.pairs.source}: cannot run the k-fold protocol ({err})") from None
    metrics.update(
        {
            "seconds": round(time.perf_counter() - start, 3),
            "num_faces": len(index_of),
            "skipped_pairs": ps.pairs.skipped,
            "fold_accuracies": res.accuracies.tolist(),
            "fold_thresholds": res.thresholds.tolist(),
            "shards": str(ps.manifest.root),
            "pairs_source": ps.pairs.source,
        }
    )
    return SetResult(ps.name, metrics, scores, same, fold_of, res)
