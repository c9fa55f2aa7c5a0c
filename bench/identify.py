"""Identification: search time over a large gallery, and the figures on real LFW.

    python -m bench.identify speed [--identities 1000000 --dim 512 --queries 1,64]
    python -m bench.identify lfw --model CKPT|M.onnx [--root ../shared/data/lfw --workers 2]
    python -m bench.identify search --model CKPT|M.onnx [--photos 500 --size 250 --people 200]

speed: random L2-normalized templates (the search cost does not depend on their values), the time
of TemplateIndex.search (one numpy matrix product + partial sort; FAISS's exact inner-product index
too when faiss-cpu is importable) for a batch of 1 face (a photo) and of 64 (a crowd, or a batch of
video frames), against the baseline in the same run: a per-identity Python loop of dot products,
timed on the first 20,000 identities and scaled linearly to the gallery size. Threads: whatever
numpy's BLAS and FAISS use by default (all cores).

search: `eval/identify.py search` over a folder of real LFW photos, end to end (start-up, model
load, detection, embedding, search, every output under --out), in photos/s. The gallery: the
first photo of --people LFW people with two or more photos, enrolled first (not timed); the folder:
--photos other LFW photos (genuine and impostor), resized to --size x --size (the official LFW
images are 250x250; the stored ones 150x150) and written as JPEGs to a temporary folder. Baseline in
the same run: the per-photo loop on the first --baseline photos in one process (read, detect,
align, embed that photo's faces, search), whose identities, boxes and scores the command's
detections.jsonl must repeat. The load average is printed beside each figure (shared machine), and
the CPU time per photo (the command's process and its detection processes).

lfw: eval/identification/lfw_figures.py's protocol (one photo enrolled per person with two or more,
their other photos searched, single-photo people as impostors); no baseline, these are accuracy
figures.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from common.cli import CliParser, UserError, cpu_count, positive, run_cli
from eval.identification.gallery import TemplateIndex, faiss_available, normalize
from models.load import add_model_arguments
from preprocess.detect import DEFAULT_MIN_SIZE

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
        args.root / "lfw", args.model, workers=args.workers, flip=not args.no_flip, runtime=args.runtime
    )
    print(figures, file=sys.stderr)
    return figures


def _load() -> float:
    return round(os.getloadavg()[0], 1)


def _cpu_s() -> float:
    """CPU seconds of this process and its ended child processes (the detection pool's): steadier
    than the wall clock on a busy machine."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _photo_folders(
    root: Path, people: int, photos: int, size: int, tmp: Path, seed: int
) -> tuple[Path, Path]:
    """(gallery folder, search folder) under tmp: the first photo of `people` LFW people with two
    or more, and `photos` other LFW photos resized to size x size."""
    folders = sorted(p for p in (root / "lfw").iterdir() if p.is_dir()) if (root / "lfw").is_dir() else []
    if not folders:
        raise UserError(f"{root / 'lfw'}: LFW image folder not found (--root)")
    rng = random.Random(seed)
    by_person = {p.name: sorted(p.glob("*.jpg")) for p in folders}
    enrolled = rng.sample([n for n, files in by_person.items() if len(files) >= 2], people)
    gallery, search = tmp / "gallery", tmp / "photos"
    gallery.mkdir()
    search.mkdir()
    for name in enrolled:
        (gallery / f"{name}.jpg").write_bytes(by_person[name][0].read_bytes())
    chosen = set(enrolled)
    others = [f for n, files in by_person.items() for f in (files[1:] if n in chosen else files)]
    for path in rng.sample(others, min(photos, len(others))):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(search / path.name), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return gallery, search


def per_photo_loop(paths: list[Path], gallery_npz: Path, args: argparse.Namespace) -> list[dict]:
    """The baseline: each photo read, detected, aligned, embedded and searched on its own, in this
    process; one record per face (source, box, identity, score, top) as detections.jsonl has them."""
    from eval.identification.faces import embed_crops, find_faces, load_face_model, read_rgb
    from eval.identification.gallery import TemplateIndex, load_gallery

    gallery = load_gallery(gallery_npz)
    model = load_face_model(args.model, runtime=args.runtime)
    index = TemplateIndex(gallery.templates)
    records = []
    for path in paths:
        rgb = read_rgb(path)
        faces = (
            []
            if rgb is None
            else find_faces(rgb, model.info.image_size, path, args.min_face or DEFAULT_MIN_SIZE)
        )
        if not faces:
            continue
        embeddings = embed_crops(model.embed, [f.crop for f in faces], flip=not args.no_flip)
        idx, scores = index.search(embeddings, 5)
        for found, row, row_scores in zip(faces, idx, scores):
            top = [[gallery.names[int(i)], round(float(s), 4)] for i, s in zip(row, row_scores)]
            records.append(
                {"source": str(path), "box": [round(float(v), 1) for v in found.face.box], "top": top}
            )
    return records


def _same_records(command: list[dict], loop: list[dict]) -> bool:
    """The command's records of the loop's photos repeat the loop's boxes, names and scores (to 1e-4:
    a batch of other size may move a float32 embedding by ~1e-7, a rounded score by one last digit)."""
    sources = {r["source"] for r in loop}
    mine = [r for r in command if r["source"] in sources]
    return len(mine) == len(loop) and all(
        a["box"] == b["box"]
        and [n for n, _ in a["top"]] == [n for n, _ in b["top"]]
        and np.allclose([s for _, s in a["top"]], [s for _, s in b["top"]], atol=2e-4)
        for a, b in zip(mine, loop)
    )


def search_speed(args: argparse.Namespace) -> dict:
    from eval.identify import run as identify

    if args.model is None:
        raise UserError("search: --model CKPT|M.onnx is required")
    with tempfile.TemporaryDirectory(prefix="bench-identify-") as name:
        tmp = Path(name)
        gallery, photos = _photo_folders(args.root, args.people, args.photos, args.size, tmp, args.seed)
        paths = sorted(photos.iterdir())
        flip = ["--no-flip"] if args.no_flip else []
        common = ["--model", str(args.model), "--runtime", args.runtime, *flip]
        detection = ["--workers", str(args.workers)] + (
            ["--min-face", str(args.min_face)] if args.min_face else []
        )
        enrol = ["enrol", "--gallery", str(gallery), "--out", str(tmp / "G.npz"), "--use-largest"]
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            identify([*enrol, *common, "--workers", str(args.workers)])
            load_before, start, cpu = _load(), time.perf_counter(), _cpu_s()
            argv = ["search", "--gallery", str(tmp / "G.npz"), str(photos), "--out", str(tmp / "out")]
            identify([*argv, *common, *detection])
            search_s, cpu_s, load_after = time.perf_counter() - start, _cpu_s() - cpu, _load()
        command = [json.loads(line) for line in (tmp / "out" / "detections.jsonl").read_text().splitlines()]
        sample = paths[: args.baseline]
        start = time.perf_counter()
        loop = per_photo_loop(sample, tmp / "G.npz", args)
        loop_s, load_loop = time.perf_counter() - start, _load()
    results = {
        "photos": len(paths),
        "size": args.size,
        "faces": len(command),
        "workers": args.workers,
        "search_s": round(search_s, 1),
        "photos_per_s": round(len(paths) / search_s, 1),
        "cpu_ms_per_photo": round(1000 * cpu_s / len(paths), 1),
        "load_average": [load_before, load_after],
        "per_photo_loop_photos": len(sample),
        "per_photo_loop_per_s": round(len(sample) / loop_s, 1),
        "per_photo_loop_load_average": load_loop,
        "speedup_vs_per_photo_loop": round((len(paths) / search_s) / (len(sample) / loop_s), 2),
        "same_results": _same_records(command, loop),
    }
    print(
        f"search: {results['photos_per_s']} photos/s ({len(paths)} photos {args.size}x{args.size}, "
        f"{len(command)} faces, {search_s:.1f} s, {results['cpu_ms_per_photo']} ms CPU per photo, load "
        f"{load_before}-{load_after}); per-photo loop "
        f"{results['per_photo_loop_per_s']} photos/s (load {load_loop}): "
        f"{results['speedup_vs_per_photo_loop']}x; same results: {results['same_results']}",
        file=sys.stderr,
    )
    return results


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
    parser.add_argument("mode", choices=("speed", "lfw", "search"))
    parser.add_argument("--identities", type=int, default=1_000_000, help="speed: gallery size")
    parser.add_argument("--dim", type=int, default=512, help="speed: embedding size")
    parser.add_argument("--queries", type=_sizes, default=[1, 64], help="speed: query batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="speed: timed repeats (best kept)")
    add_model_arguments(parser, required=False, help_prefix="lfw, search: ")
    parser.add_argument("--root", type=Path, default=DEFAULT_LFW, help="lfw, search: folder holding lfw/")
    parser.add_argument("--workers", type=int, default=2, help="lfw, search: detection processes")
    parser.add_argument("--no-flip", action="store_true", help="lfw, search: embed without the mirror image")
    parser.add_argument("--photos", type=positive, default=500, help="search: photos searched")
    parser.add_argument("--size", type=positive, default=250, help="search: their side in pixels")
    parser.add_argument("--people", type=positive, default=200, help="search: people enrolled")
    parser.add_argument("--baseline", type=positive, default=100, help="search: photos of the per-photo loop")
    parser.add_argument("--seed", type=int, default=0, help="search: which LFW photos")
    parser.add_argument(
        "--min-face", type=positive, help="search: the command's --min-face (default: its own)"
    )
    args = parser.parse_args(argv)
    if args.mode == "speed" and (args.identities < NAIVE_SLICE or args.dim < 1):
        raise UserError(f"--identities must be at least {NAIVE_SLICE:,} and --dim positive")
    result = {"speed": speed, "lfw": lfw, "search": search_speed}[args.mode](args)
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
