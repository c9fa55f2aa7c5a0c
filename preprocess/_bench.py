"""Shard building throughput: build_shards against a naive single-process loop, on the same input.

Run through bench/preprocess.py (that file's name shadows the `preprocess` package, so the work is here):

    python bench/preprocess.py [--images 1000] [--size 500x600] [--eye-px 60,200] [--workers N]

Writes a synthetic VGGFace2-layout set of marker faces (sizes and face scales as given), then times
(1) the naive loop: for each image in order, full-size cv2.imread, align, encode, append to a tar;
(2) build_shards.py with its defaults (all cores, reduced-scale decode);
and, with --detail, build_shards with one worker and with full-size decode, to separate the two gains.
Each figure is the best of --repeat runs; files are read once first so both start from a warm cache.
The last stdout line is JSON.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from preprocess import align
from preprocess._synthface import write_vggface2
from preprocess.build_shards import main as build_main
from preprocess.datasets import read_vggface2
from shards.errors import CliParser, UserError, run_cli
from shards.format import encode_label, sample_key


def naive(root: Path, out: Path) -> int:
    """The baseline: one process, full-size decode, everything in path order into one tar."""
    inputs = read_vggface2(root, "train")
    classes = sorted({e.identity for e in inputs.entries})
    label_of = {c: i for i, c in enumerate(classes)}
    count = 0
    with tarfile.open(out / "naive.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for entry in inputs.entries:
            image = cv2.imread(str(inputs.image_root / entry.rel), cv2.IMREAD_COLOR)
            pts = np.asarray(entry.landmarks).reshape(5, 2)
            ok, jpeg = cv2.imencode(".jpg", align.warp(image, pts), [cv2.IMWRITE_JPEG_QUALITY, 95])
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


def ours(root: Path, out: Path, *extra: str) -> int:
    argv = ["vggface2", "--root", str(root), "--out", str(out), "--overwrite", *extra]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = run_cli(build_main, argv)
    if code != 0:
        raise RuntimeError(f"build_shards failed with exit code {code}")
    return json.loads(stdout.getvalue().strip().splitlines()[-1])["samples"]


def best_rate(fn: Callable[[], int], repeat: int) -> float:
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        count = fn()
        rates.append(count / (time.perf_counter() - start))
    return max(rates)


def _pair(text: str, kind: type = int) -> tuple:
    parts = text.lower().replace("x", ",").split(",")
    if len(parts) != 2:
        raise UserError(f"expected two numbers like 500x600, not {text!r}")
    return kind(parts[0]), kind(parts[1])


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="bench/preprocess.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", default="500x600", help="source image WxH (default 500x600)")
    p.add_argument("--eye-px", default="60,200", help="eye distance range in source pixels (default 60,200)")
    p.add_argument("--workers", type=int, default=None, help="build_shards --workers (default: all cores)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--detail", action="store_true", help="also time 1 worker, and full-size decode")
    args = p.parse_args(argv)
    size, eye_px = _pair(args.size), _pair(args.eye_px, float)
    per_identity = 20
    identities = max(1, args.images // per_identity)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        root, out = Path(tmp) / "raw", Path(tmp) / "out"
        out.mkdir()
        print(
            f"writing {identities * per_identity} synthetic {size[0]}x{size[1]} images ...", file=sys.stderr
        )
        write_vggface2(root, identities=identities, per_identity=per_identity, size=size, eye_px=eye_px)
        for path in (root / "train").rglob("*.jpg"):  # warm the page cache for both contenders
            path.read_bytes()
        workers = ["--workers", str(args.workers)] if args.workers else []
        results = {"images": identities * per_identity, "size": list(size), "eye_px": list(eye_px)}
        results["naive_images_per_s"] = round(best_rate(lambda: naive(root, out), args.repeat), 1)
        results["ours_images_per_s"] = round(best_rate(lambda: ours(root, out, *workers), args.repeat), 1)
        if args.detail:
            results["ours_1_worker_images_per_s"] = round(
                best_rate(lambda: ours(root, out, "--workers", "1"), args.repeat), 1
            )
            results["ours_full_decode_images_per_s"] = round(
                best_rate(lambda: ours(root, out, *workers, "--no-reduced-decode"), args.repeat), 1
            )
        results["ratio"] = round(results["ours_images_per_s"] / results["naive_images_per_s"], 2)
        for key, value in results.items():
            print(f"{key:32s} {value}", file=sys.stderr)
        print(json.dumps({"bench": "preprocess", **results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
