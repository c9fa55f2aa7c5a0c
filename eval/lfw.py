"""LFW-protocol verification of an embedding model on LFW shards.

    python eval/lfw.py --checkpoint CKPT --shards LFW_SHARDS [--json FILE] [--roc FILE.png]
    python eval/lfw.py --onnx MODEL.onnx --shards LFW_SHARDS ...

Reads the aligned faces from the shards (never the raw images), embeds each face once (with its
mirror image added unless --no-flip), scores pairs by cosine similarity and runs the 10-fold
protocol on the pairs' folds (eval/verification.py). The metrics line goes to stdout, progress and
logs to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.cli import CliParser, UserError, run_cli
from common.fileio import atomic_write_text
from eval.embed import EmbedFn, embed_shards, model_embedder
from eval.verification.metrics import (
    KFoldResult,
    NonFiniteEmbeddings,
    kfold,
    pair_scores,
    verification_metrics,
)
from eval.verification.shard_faces import Member, manifest_pairs, read_jpeg, read_pairs_file, shard_jpegs
from shards.manifest import Manifest, Pair, load_manifest


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="eval/lfw.py", description=__doc__.split("\n\n")[0],
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=Path, help="facetrain checkpoint (.pt)")
    model.add_argument("--onnx", type=Path, help="ONNX embedding model (input as DESIGN.md)")
    p.add_argument("--shards", type=Path, required=True, help="LFW shard folder (with manifest.json)")
    p.add_argument("--pairs", type=Path,
                   help="pairs.txt in the standard format (default: the manifest's pairs)")
    p.add_argument("--json", type=Path, help="write the metrics JSON here")
    p.add_argument("--roc", type=Path, help="draw the ROC curve (log-scale FAR) to this PNG")
    p.add_argument("--failures", type=Path, help="PNG sheet of the hardest failed pairs")
    p.add_argument("--num-failures", type=int, default=12, help="pairs on the failures sheet (default 12)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="faces per forward (x2 with flip); default 32 on cpu, 256 on cuda")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--workers", type=int, default=0, help="decode workers of the shard reader")
    p.add_argument("--no-flip", action="store_true", help="no flip test-time augmentation")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def load_embedder(args: argparse.Namespace, manifest: Manifest) -> tuple[EmbedFn, str]:
    embed, name, size = model_embedder(args.checkpoint, args.onnx, args.device, tuple(manifest.image_size))
    if size != tuple(manifest.image_size):
        raise UserError(f"{args.checkpoint}: model takes {size} faces, the shards in {manifest.root} "
                        f"hold {tuple(manifest.image_size)}")
    return embed, name


def format_metrics(m: dict[str, Any]) -> str:
    """One line in the reference project's form."""
    return (f"LFW ACC: {m['accuracy_mean']:.4f} +- {m['accuracy_std']:.4f}  "
            f"(same: {m['same_accuracy']:.4f}, diff: {m['diff_accuracy']:.4f})  "
            f"AUC {m['auc']:.4f}  threshold {m['threshold']:.4f}  "
            f"TAR@FAR=1e-3 {m['tar_at_far_1e-3']:.3f}")


def hardest_failures(pairs: Sequence[Pair], scores: np.ndarray, folds: np.ndarray,
                     fold_ids: np.ndarray, thresholds: np.ndarray, predicted: np.ndarray,
                     n: int) -> list[tuple[str, str, bool, float, float]]:
    """Mis-scored pairs, farthest from their fold's threshold first."""
    thr = thresholds[np.searchsorted(fold_ids, folds)]
    same = np.array([p.same for p in pairs], bool)
    wrong = np.flatnonzero(predicted != same)
    order = wrong[np.argsort(-np.abs(scores[wrong] - thr[wrong]), kind="stable")][:n]
    return [(pairs[i].a, pairs[i].b, bool(same[i]), float(scores[i]), float(thr[i])) for i in order]


def _save_plots(args: argparse.Namespace, pairs: list[Pair], members: dict[str, Member],
                scores: np.ndarray, same: np.ndarray, folds: np.ndarray, res: KFoldResult,
                metrics: dict[str, Any], model_name: str) -> None:
    from eval.verification import plots  # matplotlib only when a picture is asked for

    if args.roc:
        plots.save_roc(args.roc, scores, same, f"LFW ROC: {Path(model_name.split()[0]).name}, "
                       f"acc {metrics['accuracy_mean']:.4f}")
    if args.failures:
        rows = hardest_failures(pairs, scores, folds, res.fold_ids, res.thresholds,
                                res.predicted_same, max(args.num_failures, 0))
        plots.save_failures(args.failures, rows, lambda key: read_jpeg(members[key]))


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size is None:
        # On CPU, small batches are ~2x faster here: big activations cost page faults each forward.
        args.batch_size = 256 if args.device == "cuda" else 32
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    start = time.perf_counter()
    manifest = load_manifest(args.shards)
    members = shard_jpegs(manifest)
    pairs = read_pairs_file(args.pairs, members) if args.pairs else manifest_pairs(manifest, members)
    embed, model_name = load_embedder(args, manifest)
    print(f"evaluating {model_name} on {len(pairs)} pairs of {manifest.root} "
          f"({manifest.num_samples} faces, flip {'off' if args.no_flip else 'on'})", file=sys.stderr)

    emb, index_of = embed_shards(embed, manifest, batch_size=args.batch_size, flip=not args.no_flip,
                                 workers=args.workers, show_progress=not args.quiet)
    try:
        scores, same, folds = pair_scores(emb, index_of, pairs)
    except KeyError as err:  # the .idx listed it but the reader did not deliver it
        raise UserError(f"{manifest.root}: {err.args[0]} (shard and index disagree?)") from None
    except NonFiniteEmbeddings as err:
        raise UserError(f"{model_name.split()[0]}: {err}; the model's weights are not usable "
                        "(a diverged training run?)") from None
    try:
        metrics = verification_metrics(scores, same, folds)
        res = kfold(scores, same, folds)
    except ValueError as err:
        raise UserError(f"{args.pairs or manifest.root}: cannot run the k-fold protocol ({err})") from None
    metrics["seconds"] = round(time.perf_counter() - start, 3)

    print(format_metrics(metrics))
    print(f"folds: {' '.join(f'{a:.3f}' for a in res.accuracies)}; "
          f"{metrics['num_pairs']} pairs in {metrics['seconds']:.1f} s", file=sys.stderr)
    if args.json:
        record = {**metrics, "fold_accuracies": res.accuracies.tolist(),
                  "fold_thresholds": res.thresholds.tolist(), "flip": not args.no_flip,
                  "model": model_name, "shards": str(manifest.root)}
        atomic_write_text(args.json, json.dumps(record, indent=1) + "\n", what="metrics JSON")
    if args.roc or args.failures:
        _save_plots(args, pairs, members, scores, same, folds, res, metrics, model_name)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
