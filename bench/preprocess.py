"""Shard building throughput: build_shards against a naive single-process loop, on the same input.

    python -m bench.preprocess [--root DIR] [--images 1000] [--size 500x600] [--eye-px 60,200]
                               [--workers 1,0] [--repeat 3]

Input: `--root DIR`, any VGGFace2-layout folder (`train/<id>/<file>.jpg`, `train_list.txt`,
`bb_landmark/loose_landmark_train.csv`), e.g. real photos; else a synthetic set of marker faces
(sizes and face scales as given) written to a temporary folder.

Contenders, run in alternating rounds so a shared, noisy machine slows them alike:
(1) the naive loop: for each image in order, full-size cv2.imread, similarity warp, cv2.imencode
q95, append to one tar; (2) build_shards.py with each `--workers` value (0: its default, all cores).
Reports each contender's range of images/s over the rounds, the range of the per-round ratio to
the naive loop, each contender's CPU time per image (build_shards: parent and workers), and the
machine's limit: the per-image decode + warp + encode cost, measured in this process, times the
images, over the cores.
The last stdout line is JSON.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from common.cli import (
    CliParser,
    UserError,
    cpu_count,
    run_cli,
)
from preprocess import align
from preprocess._marker_faces import write_vggface2
from preprocess.build_shards import main as build_main
from preprocess.datasets import read_vggface2
from shards.format import encode_label, sample_key


def naive(root: Path, out: Path) -> int:
    """The baseline: one process, full-size decode, everything in path order into one tar."""
    inputs = read_vggface2(root, "train")
    classes = sorted({e.identity for e in inputs.entries})
    label_of = {c: i for i, c in enumerate(classes)}
    count = 0
    with tarfile.open(out / "naive.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for entry in inputs.entries:
            if entry.landmarks is None:
                continue
            image = cv2.imread(str(inputs.image_root / entry.rel), cv2.IMREAD_COLOR)
            pts = np.asarray(entry.landmarks).reshape(5, 2)
            matrix = align.similarity_transform(pts, align.template((112, 112)))
            crop = cv2.warpAffine(image, matrix, (112, 112), flags=cv2.INTER_LINEAR)  # as users write it
            ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
            record = json.dumps({"identity": entry.identity, "source": entry.rel}).encode()
            key = sample_key(entry.rel)
            for ext, data in (
                ("jpg", jpeg.tobytes()),
                ("lbl", encode_label(label_of[entry.identity])),
                ("json", record),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count


def ours(root: Path, out: Path, workers: int) -> dict:
    argv = ["vggface2", "--root", str(root), "--out", str(out), "--overwrite"]
    argv += ["--workers", str(workers)] if workers else []
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = run_cli(build_main, argv)
    if code != 0:
        raise RuntimeError(f"build_shards failed with exit code {code}")
    return json.loads(stdout.getvalue().strip().splitlines()[-1])  # its summary


def timed(fn) -> tuple[float, float]:
    """(images per second, CPU milliseconds per image) of one run: the naive loop's own process
    time, or build_shards' figure for its parent and workers (which this process cannot see)."""
    cpu, start = time.process_time(), time.perf_counter()
    result = fn()
    wall = time.perf_counter() - start
    if isinstance(result, dict):
        return result["samples"] / wall, result["cpu_ms_per_image"]
    return result / wall, 1e3 * (time.process_time() - cpu) / result


def core_cost(root: Path, sample: int = 1000) -> float:
    """Seconds per image of decode + warp + encode alone (one thread): the work no pipeline avoids."""
    inputs = read_vggface2(root, "train")
    entries = [e for e in inputs.entries if e.landmarks is not None][:sample]
    blobs = [(inputs.image_root / e.rel).read_bytes() for e in entries]
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        start = time.process_time()
        for entry, blob in zip(entries, blobs):
            image = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
            crop = align.warp(image, np.asarray(entry.landmarks).reshape(5, 2))
            cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
        return (time.process_time() - start) / len(entries)
    finally:
        cv2.setNumThreads(threads)


def _pair(text: str, kind: type = int) -> tuple:
    parts = text.lower().replace("x", ",").split(",")
    if len(parts) != 2:
        raise UserError(f"expected two numbers like 500x600, not {text!r}")
    return kind(parts[0]), kind(parts[1])


def _workers(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--workers: expected numbers like 1,2,0 (0: the default), not {text!r}") from None
    if any(v < 0 for v in values):
        raise UserError(f"--workers: counts must be 0 (the default) or more, not {text!r}")
    return values


def _span(values: list[float], digits: int = 1) -> str:
    return f"{round(min(values), digits)}-{round(max(values), digits)}"


def measure(root: Path, out: Path, workers: list[int], repeat: int) -> dict:
    for path in (root / "train").rglob("*"):  # warm the page cache for every contender
        if path.is_file():
            path.read_bytes()
    names = ["naive"] + [f"ours_workers_{w or 'default'}" for w in workers]
    rates: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
    for round_number in range(repeat):
        runs = [lambda: naive(root, out)] + [lambda w=w: ours(root, out / "o", w) for w in workers]
        order = list(zip(names, runs))
        if round_number % 2:  # alternate who goes first
            order.reverse()
        for name, fn in order:
            rate, cpu_ms = timed(fn)
            rates[name].append(rate)
            cpu[name].append(cpu_ms)
            print(f"round {round_number + 1}: {name:24s} {rate:8.0f} images/s", file=sys.stderr, flush=True)
        for name in ratios:
            ratios[name].append(rates[name][-1] / rates["naive"][-1])
    cost = core_cost(root)
    cores = cpu_count()
    best = max(max(v) for k, v in rates.items() if k != "naive")
    return {
        "images_per_s": {k: _span(v, 0) for k, v in rates.items()},
        "ratio_to_naive": {k: _span(v, 2) for k, v in ratios.items()},
        "cpu_ms_per_image": {k: _span(v, 3) for k, v in cpu.items()},
        "core_ms_per_image": round(cost * 1e3, 3),
        "cores": cores,
        "limit_images_per_s": round(cores / cost),
        "best_fraction_of_limit": round(best * cost / cores, 2),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def run(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m bench.preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, help="a VGGFace2-layout folder (default: generate marker faces)")
    p.add_argument("--images", type=int, default=1000, help="synthetic images (without --root)")
    p.add_argument("--size", default="500x600", help="synthetic image WxH (default 500x600)")
    p.add_argument("--eye-px", default="60,200", help="synthetic eye distance range, source pixels")
    p.add_argument("--workers", default="1,0", help="build_shards --workers values (0: default; default 1,0)")
    p.add_argument("--repeat", type=int, default=3, help="alternating rounds (default 3)")
    args = p.parse_args(argv)
    workers = _workers(args.workers)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        if args.root is not None:
            if not (args.root / "train").is_dir():
                raise UserError(f"{args.root}: --root has no train/ folder (VGGFace2 layout)")
            root, source = args.root, str(args.root)
        else:
            size, eye_px = _pair(args.size), _pair(args.eye_px, float)
            identities = max(1, args.images // 20)
            root, source = Path(tmp) / "raw", f"synthetic {size[0]}x{size[1]}, eyes {eye_px} px"
            print(f"writing {identities * 20} synthetic images ...", file=sys.stderr)
            write_vggface2(root, identities=identities, per_identity=20, size=size, eye_px=eye_px)
        results = {"source": source, "images": len(read_vggface2(root, "train").entries)}
        results.update(measure(root, out, workers, args.repeat))
    for key, value in results.items():
        print(f"{key:24s} {value}", file=sys.stderr)
    print(json.dumps({"bench": "preprocess", **results}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
