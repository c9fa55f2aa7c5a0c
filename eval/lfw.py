"""LFW-protocol verification of an embedding model on LFW shards.

    python eval/lfw.py --checkpoint CKPT --shards LFW_SHARDS [--json FILE] [--roc FILE.png]
    python eval/lfw.py --onnx MODEL.onnx --shards LFW_SHARDS ...

The LFW preset of eval/verify.py: one set, named lfw, scored by the same path
(eval/verification/sets.py): the faces the pairs use read from the shards (never the raw images),
each embedded once with its mirror image added unless --no-flip, pairs scored by cosine similarity
and the 10-fold protocol run on the pairs' folds. The metrics line goes to stdout in the reference
project's form, progress and logs to stderr; --failures draws the hardest failed pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.cli import CliParser, run_cli
from common.fileio import atomic_write_text
from eval.verification.command import add_run_arguments, evaluate_sets, resolve_batch_size, set_embedder
from eval.verification.sets import PreparedSet, SetResult, prepare_set
from eval.verification.shard_faces import read_jpeg, shard_jpegs
from models.load import add_model_arguments
from shards.manifest import load_manifest


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(
        prog="eval/lfw.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--shards", type=Path, required=True, help="LFW shard folder (with manifest.json)")
    p.add_argument(
        "--pairs",
        type=Path,
        help="pairs file (View 2, View 1 or a plain list, as eval/verify.py reads) in place of "
        "the manifest's pairs",
    )
    p.add_argument("--json", type=Path, help="write the metrics JSON here")
    p.add_argument("--roc", type=Path, help="draw the ROC curve (log-scale FAR) to this PNG")
    p.add_argument("--failures", type=Path, help="PNG sheet of the hardest failed pairs")
    p.add_argument("--num-failures", type=int, default=12, help="pairs on the failures sheet (default 12)")
    add_run_arguments(p)
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="accepted for old command lines; faces are decoded two batches ahead in a thread",
    )
    return p


def format_metrics(m: dict[str, Any]) -> str:
    """One line in the reference project's form."""
    return (
        f"LFW ACC: {m['accuracy_mean']:.4f} +- {m['accuracy_std']:.4f}  "
        f"(same: {m['same_accuracy']:.4f}, diff: {m['diff_accuracy']:.4f})  "
        f"AUC {m['auc']:.4f}  threshold {m['threshold']:.4f}  "
        f"TAR@FAR=1e-3 {m['tar_at_far_1e-3']:.3f}"
    )


def hardest_failures(ps: PreparedSet, r: SetResult, n: int) -> list[tuple[str, str, bool, float, float]]:
    """Mis-scored pairs, farthest from their fold's threshold first."""
    thr = r.kfold.thresholds[np.searchsorted(r.kfold.fold_ids, r.folds)]
    wrong = np.flatnonzero(r.kfold.predicted_same != r.same)
    order = wrong[np.argsort(-np.abs(r.scores[wrong] - thr[wrong]), kind="stable")][:n]
    pairs = ps.pairs.pairs
    return [(pairs[i].a, pairs[i].b, bool(r.same[i]), float(r.scores[i]), float(thr[i])) for i in order]


def _save_plots(args: argparse.Namespace, ps: PreparedSet, r: SetResult, model_name: str) -> None:
    from eval.verification import plots  # matplotlib only when a picture is asked for

    if args.roc:
        plots.save_roc(
            args.roc,
            r.scores,
            r.same,
            f"LFW ROC: {Path(model_name.split()[0]).name}, acc {r.metrics['accuracy_mean']:.4f}",
        )
    if args.failures:
        members = shard_jpegs(ps.manifest)
        rows = hardest_failures(ps, r, max(args.num_failures, 0))
        plots.save_failures(args.failures, rows, lambda key: read_jpeg(members[key]))


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    batch_size = resolve_batch_size(args)
    manifest = load_manifest(args.shards)
    ps = prepare_set("lfw", manifest, pairs_file=args.pairs, folds=args.folds, skip_missing=args.skip_missing)
    embed, model_name, parallel = set_embedder(args, manifest)
    flip = not args.no_flip
    print(
        f"evaluating {model_name} on {len(ps.pairs.pairs)} pairs of {manifest.root} "
        f"({manifest.num_samples} faces, flip {'on' if flip else 'off'})",
        file=sys.stderr,
    )
    [r] = evaluate_sets(
        embed,
        model_name,
        [ps],
        batch_size=batch_size,
        flip=flip,
        parallel=parallel,
        show_progress=not args.quiet,
    )
    m = r.metrics
    print(format_metrics(m))
    print(
        f"folds: {' '.join(f'{a:.3f}' for a in m['fold_accuracies'])}; "
        f"{m['num_pairs']} pairs in {m['seconds']:.1f} s",
        file=sys.stderr,
    )
    if args.json:
        record = {**m, "flip": flip, "model": model_name}
        atomic_write_text(args.json, json.dumps(record, indent=1) + "\n", what="metrics JSON")
    if args.roc or args.failures:
        _save_plots(args, ps, r, model_name)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
