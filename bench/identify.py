"""Identification: search time over a large gallery, and the figures on real LFW.

    python -m bench.identify speed [--identities 1000000 --dim 512 --queries 1,64]
    python -m bench.identify lfw --model CKPT|M.onnx [--root ../shared/data/lfw --workers 2]

speed: random L2-normalized templates (the search cost does not depend on their values), the time
of TemplateIndex.search (one numpy matrix product + partial sort; FAISS's exact inner-product index
too when faiss-cpu is importable) for a batch of 1 face (a photo) and of 64 (a crowd, or a batch of
video frames), against the baseline in the same run: a per-identity Python loop of dot products,
timed on the first 20,000 identities and scaled linearly to the gallery size. Threads: whatever
numpy's BLAS and FAISS use by default (all cores).

lfw: eval/identification/lfw_figures.py's protocol (one photo enrolled per person with two or more,
their other photos searched, single-photo people as impostors); no baseline, these are accuracy
figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

from common.cli import CliParser, UserError, cpu_count, run_cli
from eval.identification.gallery import TemplateIndex, faiss_available, normalize
from models.load import add_model_arguments

NAIVE_SLICE = 20_000
DEFAULT_LFW = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lfw"


def _best_time(fn, repeats: int) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def naive_search(templates: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    """The baseline: one dot product per identity in a Python loop, then a sort."""
    scores = [float(np.dot(t, query)) for t in templates]
    return sorted(range(len(scores)), key=scores.__getitem__, reverse=True)[:k]


def speed(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    print(
        f"{args.identities:,} templates of {args.dim} floats "
        f"({args.identities * args.dim * 4 / 2**30:.2f} GiB)",
        file=sys.stderr,
    )
    templates = normalize(rng.standard_normal((args.identities, args.dim), dtype=np.float32))
    queries = normalize(rng.standard_normal((max(args.queries), args.dim), dtype=np.float32))
    naive_s = _best_time(lambda: naive_search(templates[:NAIVE_SLICE], queries[0], 5), 2)
    naive_s *= args.identities / NAIVE_SLICE
    results: dict = {
        "identities": args.identities,
        "dim": args.dim,
        "cores": cpu_count(),
        "naive_loop_s_per_query": round(naive_s, 3),
    }
    backends = ["numpy"] + (["faiss"] if faiss_available() else [])
    for backend in backends:
        start = time.perf_counter()
        index = TemplateIndex(templates, backend=backend)
        build_s = time.perf_counter() - start
        for q in args.queries:
            t = _best_time(functools.partial(index.search, queries[:q], 5), args.repeats)
            results[f"{backend}_s_batch{q}"] = round(t, 4)
            results[f"{backend}_ms_per_query_batch{q}"] = round(1000 * t / q, 3)
            print(
                f"{backend}: batch of {q}: {t * 1000:.1f} ms ({t * 1000 / q:.2f} ms per face)",
                file=sys.stderr,
            )
        results[f"{backend}_build_s"] = round(build_s, 3)
        if backend == "numpy":  # the fast path finds what the loop finds (on the loop's slice)
            small = TemplateIndex(templates[:NAIVE_SLICE], backend="numpy").search(queries[:1], 5)[0][0]
            assert small.tolist() == naive_search(templates[:NAIVE_SLICE], queries[0], 5)
        del index
    results["speedup_numpy_batch1_vs_naive"] = round(naive_s / results["numpy_s_batch1"], 1)
    print(
        f"naive loop: {naive_s:.2f} s per face (from {NAIVE_SLICE:,} identities, scaled); numpy one "
        f"face: {results['speedup_numpy_batch1_vs_naive']}x faster",
        file=sys.stderr,
    )
    return results


def lfw(args: argparse.Namespace) -> dict:
    from eval.identification.lfw_figures import identification_figures

    if args.model is None:
        raise UserError("lfw: --model CKPT|M.onnx is required")
    figures = identification_figures(
        args.root / "lfw", args.model, workers=args.workers, flip=not args.no_flip
    )
    print(figures, file=sys.stderr)
    return figures


def _sizes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return values


def run(argv: list[str] | None = None) -> int:
    parser = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("speed", "lfw"))
    parser.add_argument("--identities", type=int, default=1_000_000, help="speed: gallery size")
    parser.add_argument("--dim", type=int, default=512, help="speed: embedding size")
    parser.add_argument("--queries", type=_sizes, default=[1, 64], help="speed: query batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="speed: timed repeats (best kept)")
    add_model_arguments(parser, required=False, help_prefix="lfw: ", runtime=False)
    parser.add_argument("--root", type=Path, default=DEFAULT_LFW, help="lfw: folder holding lfw/")
    parser.add_argument("--workers", type=int, default=2, help="lfw: detection processes")
    parser.add_argument("--no-flip", action="store_true", help="lfw: embed without the mirror image")
    args = parser.parse_args(argv)
    if args.mode == "speed" and (args.identities < NAIVE_SLICE or args.dim < 1):
        raise UserError(f"--identities must be at least {NAIVE_SLICE:,} and --dim positive")
    result = speed(args) if args.mode == "speed" else lfw(args)
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
