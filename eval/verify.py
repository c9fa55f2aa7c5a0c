"""Verification of one embedding model on several pair sets: LFW, CFP-FP, AgeDB-30, ... or your own.

    python eval/verify.py --checkpoint CKPT --sets lfw=SHARDS cfp_fp=SHARDS agedb_30=SHARDS \
        [--json metrics.json] [--roc roc.png]
    python eval/verify.py --onnx MODEL.onnx --sets mine=SHARDS --pairs mine=pairs.txt --folds 10

Each set is a shard folder: LFW shards (`build_shards.py lfw`), an imported InsightFace pack
(`eval/import_bin.py`), or any shards with `--pairs NAME=FILE` (View 2, View 1 or a plain
`path_a path_b same` list; see eval/verification/pairsets.py). Only the faces the pairs use are embedded, with
their mirror image added unless --no-flip; pairs are scored by cosine and run through the k-fold
protocol of eval/verification/metrics.py. stdout: one table (accuracy +- std over the folds, AUC,
TAR@FAR=1e-3, threshold per set); --json: the Metrics JSON of each set in one file; --roc: the ROC
curves of all sets in one PNG. `eval/lfw.py` is the LFW preset of this command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from common.cli import CliParser, UserError, run_cli
from common.fileio import atomic_write_text
from eval.verification.command import add_run_arguments, evaluate_sets, resolve_batch_size, set_embedder
from eval.verification.sets import SetResult, prepare_set
from models.load import add_model_arguments
from shards.manifest import Manifest, load_manifest


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


def format_table(results: Sequence[SetResult]) -> str:
    width = max(8, *(len(r.name) for r in results))
    lines = [
        f"{'set':<{width}}  {'pairs':>6}  {'accuracy':>17}  {'AUC':>6}  {'TAR@FAR=1e-3':>12}  "
        f"{'threshold':>9}"
    ]
    for r in results:
        m = r.metrics
        acc = f"{m['accuracy_mean']:.4f} +- {m['accuracy_std']:.4f}"
        lines.append(
            f"{r.name:<{width}}  {m['num_pairs']:>6}  {acc:>17}  {m['auc']:>6.4f}  "
            f"{m['tar_at_far_1e-3']:>12.4f}  {m['threshold']:>9.4f}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(
        prog="eval/verify.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_model_arguments(p)
    p.add_argument("--sets", nargs="+", required=True, metavar="NAME=SHARDS", help="the sets, in table order")
    p.add_argument(
        "--pairs",
        nargs="+",
        default=[],
        metavar="NAME=FILE",
        help="score set NAME on this pairs file instead of its manifest's pairs",
    )
    p.add_argument("--json", type=Path, help="write every set's metrics JSON into this file")
    p.add_argument("--roc", type=Path, help="draw the ROC curves of all sets into this PNG")
    add_run_arguments(p)
    return p


def _check_sizes(manifests: dict[str, Manifest]) -> None:
    sizes = {tuple(m.image_size) for m in manifests.values()}
    if len(sizes) > 1:
        listing = ", ".join(f"{n}: {m.image_size[0]}x{m.image_size[1]}" for n, m in manifests.items())
        raise UserError(f"--sets: one model takes one face size, the sets hold {listing}")


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    batch_size = resolve_batch_size(args)
    sets = _name_value(args.sets, "--sets")
    pairs_files = _name_value(args.pairs, "--pairs")
    for name in pairs_files:
        if name not in sets:
            raise UserError(f"--pairs {name}=...: no set named {name!r} in --sets")
    manifests = {name: load_manifest(Path(d)) for name, d in sets.items()}
    _check_sizes(manifests)
    prepared = [
        prepare_set(
            name,
            m,
            pairs_file=Path(pairs_files[name]) if name in pairs_files else None,
            folds=args.folds,
            skip_missing=args.skip_missing,
        )
        for name, m in manifests.items()
    ]
    embed, model_name, parallel = set_embedder(args, next(iter(manifests.values())))
    flip = not args.no_flip
    print(f"evaluating {model_name} on {len(sets)} sets (flip {'on' if flip else 'off'})", file=sys.stderr)
    results = evaluate_sets(
        embed,
        model_name,
        prepared,
        batch_size=batch_size,
        flip=flip,
        parallel=parallel,
        show_progress=not args.quiet,
    )
    print(format_table(results))
    if args.json:
        doc = {"model": model_name, "flip": flip, "sets": {r.name: r.metrics for r in results}}
        atomic_write_text(args.json, json.dumps(doc, indent=1) + "\n", what="metrics JSON")
    if args.roc:
        from eval.verification import plots  # matplotlib only when a picture is asked for

        plots.save_rocs(
            args.roc,
            {r.name: (r.scores, r.same) for r in results},
            f"ROC: {Path(model_name.split()[0]).name}",
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
