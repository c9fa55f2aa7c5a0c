"""Verification of one embedding model on several pair sets: LFW, CFP-FP, AgeDB-30, ... or your own.

    python eval/verify.py --checkpoint CKPT --sets lfw=SHARDS cfp_fp=SHARDS agedb_30=SHARDS \
        [--json metrics.json] [--roc roc.png]
    python eval/verify.py --onnx MODEL.onnx --sets mine=SHARDS --pairs mine=pairs.txt --folds 10

Each set is a shard folder: LFW shards (`build_shards.py lfw`), an imported InsightFace pack
(`eval/import_bin.py`), or any shards with `--pairs NAME=FILE` (View 2, View 1 or a plain
`path_a path_b same` list; see eval/pairsets.py). Only the faces the pairs use are embedded, with
their mirror image added unless --no-flip; pairs are scored by cosine and run through the k-fold
protocol of eval/verification.py. stdout: one table (accuracy +- std over the folds, AUC,
TAR@FAR=1e-3, threshold per set); --json: the Metrics JSON of each set in one file; --roc: the ROC
curves of all sets in one PNG. `eval/lfw.py` stays as the LFW shorthand.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.cli import CliParser, UserError, cpu_count, run_cli
from common.fileio import atomic_write_text
from eval.embed import EmbedFn
from eval.embed_keys import embed_keys
from eval.pairsets import PairSet, set_pairs
from eval.verification import kfold, pair_scores, verification_metrics
from models.load import add_model_arguments, model_from_args
from shards.manifest import Manifest, load_manifest
from shards.sample_index import SampleTable, build_sample_table


@dataclass
class SetResult:
    name: str
    metrics: dict[str, Any]  # the Metrics JSON of DESIGN.md plus folds and skips
    scores: np.ndarray
    same: np.ndarray


def _name_value(items: Sequence[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UserError(f"{option} {item!r}: expected NAME=PATH")
        if not all(c.isalnum() or c in "_-." for c in name):
            raise UserError(f"{option} {item!r}: a set name is letters, digits, '_', '-' or '.'")
        if name in out:
            raise UserError(f"{option}: set {name!r} is named twice")
        out[name] = value
    return out


@dataclass
class PreparedSet:
    """A set checked and ready to embed: its shards, where each face is, the pairs to score."""

    name: str
    manifest: Manifest
    table: SampleTable  # where each face is (with the keys)
    pairs: PairSet


def prepare_set(name: str, manifest: Manifest, *, pairs_file: Path | None = None, folds: int | None = None,
                skip_missing: bool = False) -> PreparedSet:
    """Resolve a set's pairs against its shards; every mistake surfaces here, before any embedding."""
    table = build_sample_table(manifest, want_keys=True)
    keys = set(table.keys or [])
    return PreparedSet(name, manifest, table, set_pairs(manifest, keys, pairs_file, folds, skip_missing))


def evaluate_set(embed: EmbedFn, ps: PreparedSet, *, batch_size: int = 32, flip: bool = True,
                 parallel: int = 1, show_progress: bool = True) -> SetResult:
    """Embed the faces this set's pairs use and score them by the k-fold protocol."""
    start = time.perf_counter()
    pairs = ps.pairs.pairs
    keys = [k for p in pairs for k in (p.a, p.b)]
    emb, index_of = embed_keys(embed, ps.manifest, ps.table, keys, batch_size=batch_size, flip=flip,
                               parallel=parallel, show_progress=show_progress, label=ps.name)
    scores, same, fold_of = pair_scores(emb, index_of, pairs)
    try:
        metrics = verification_metrics(scores, same, fold_of)
        res = kfold(scores, same, fold_of)
    except ValueError as err:
        raise UserError(f"{ps.pairs.source}: cannot run the k-fold protocol ({err})") from None
    metrics.update({"seconds": round(time.perf_counter() - start, 3), "num_faces": len(index_of),
                    "skipped_pairs": ps.pairs.skipped, "fold_accuracies": res.accuracies.tolist(),
                    "fold_thresholds": res.thresholds.tolist(), "shards": str(ps.manifest.root),
                    "pairs_source": ps.pairs.source})
    return SetResult(ps.name, metrics, scores, same)


def format_table(results: Sequence[SetResult]) -> str:
    width = max(8, *(len(r.name) for r in results))
    lines = [f"{'set':<{width}}  {'pairs':>6}  {'accuracy':>17}  {'AUC':>6}  {'TAR@FAR=1e-3':>12}  "
             f"{'threshold':>9}"]
    for r in results:
        m = r.metrics
        acc = f"{m['accuracy_mean']:.4f} +- {m['accuracy_std']:.4f}"
        lines.append(f"{r.name:<{width}}  {m['num_pairs']:>6}  {acc:>17}  {m['auc']:>6.4f}  "
                     f"{m['tar_at_far_1e-3']:>12.4f}  {m['threshold']:>9.4f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="eval/verify.py", description=__doc__.split("\n\n")[0],
                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_model_arguments(p)
    p.add_argument("--sets", nargs="+", required=True, metavar="NAME=SHARDS", help="the sets, in table order")
    p.add_argument("--pairs", nargs="+", default=[], metavar="NAME=FILE",
                   help="score set NAME on this pairs file instead of its manifest's pairs")
    p.add_argument("--folds", type=int, help="split one-fold pairs (View 1, plain lists) into K folds")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out pairs naming an image the shards lack (reported), instead of failing")
    p.add_argument("--json", type=Path, help="write every set's metrics JSON into this file")
    p.add_argument("--roc", type=Path, help="draw the ROC curves of all sets into this PNG")
    p.add_argument("--batch-size", type=int, default=None,
                   help="faces per forward (x2 with flip); default 8 on cpu, 256 on cuda")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--parallel", type=int, default=None,
                   help="ONNX on cpu: batches run at once, one thread each (default: the cores)")
    p.add_argument("--no-flip", action="store_true", help="no flip test-time augmentation")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _check_sizes(manifests: dict[str, Manifest]) -> None:
    sizes = {tuple(m.image_size) for m in manifests.values()}
    if len(sizes) > 1:
        listing = ", ".join(f"{n}: {m.image_size[0]}x{m.image_size[1]}" for n, m in manifests.items())
        raise UserError(f"--sets: one model takes one face size, the sets hold {listing}")


def _embedder(args: argparse.Namespace, manifest: Manifest) -> tuple[EmbedFn, str, int]:
    """(model, its name, batches to run at once): ONNX on the CPU runs one single-threaded batch per
    core, which on 2 busy cores is faster than one session spreading each small batch over both."""
    parallel = args.parallel if args.parallel is not None else cpu_count()
    if parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {parallel}")
    several = args.device == "cpu" and parallel > 1  # (for an ONNX model: checkpoints run one at a time)
    model = model_from_args(args, image_size=tuple(manifest.image_size), onnx_threads=1 if several else None)
    model.check_size(manifest.image_size, f"the shards in {manifest.root}")
    return model.embed, model.name, parallel if several and model.kind in ("onnx", "openvino") else 1


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size is None:
        # On 2 CPU cores small batches are fastest (bench/verify.py); a GPU wants large ones.
        args.batch_size = 256 if args.device == "cuda" else 8
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    sets = _name_value(args.sets, "--sets")
    pairs_files = _name_value(args.pairs, "--pairs")
    for name in pairs_files:
        if name not in sets:
            raise UserError(f"--pairs {name}=...: no set named {name!r} in --sets")
    manifests = {name: load_manifest(Path(d)) for name, d in sets.items()}
    _check_sizes(manifests)
    prepared = [prepare_set(name, m, pairs_file=Path(pairs_files[name]) if name in pairs_files else None,
                            folds=args.folds, skip_missing=args.skip_missing)
                for name, m in manifests.items()]
    embed, model_name, parallel = _embedder(args, next(iter(manifests.values())))
    flip = not args.no_flip
    print(f"evaluating {model_name} on {len(sets)} sets (flip {'on' if flip else 'off'})", file=sys.stderr)
    results = []
    for ps in prepared:
        if ps.pairs.skipped:
            print(f"{ps.name}: skipped {ps.pairs.skipped} pairs naming images not in {ps.manifest.root}",
                  file=sys.stderr)
        results.append(evaluate_set(embed, ps, batch_size=args.batch_size, flip=flip, parallel=parallel,
                                    show_progress=not args.quiet))
    print(format_table(results))
    if args.json:
        doc = {"model": model_name, "flip": flip, "sets": {r.name: r.metrics for r in results}}
        atomic_write_text(args.json, json.dumps(doc, indent=1) + "\n", what="metrics JSON")
    if args.roc:
        from eval import plots  # matplotlib only when a picture is asked for

        plots.save_rocs(args.roc, {r.name: (r.scores, r.same) for r in results},
                        f"ROC: {Path(model_name.split()[0]).name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
