"""Synthetic face photographs in the exact on-disk layouts of VGGFace2 and LFW.

    python preprocess/synthetic.py --out DIR [--identities N] [--images-per-identity K]
        [--lfw-identities M] [--pairs-per-fold P] [--seed S] [--workers W]

Writes DIR/vggface2/ (train/<id>/<NNNN_NN>.jpg, train_list.txt, meta/identity_meta.csv,
bb_landmark/loose_landmark_train.csv, bb_landmark/loose_bb_train.csv) and DIR/lfw/
(lfw/<Name>/<Name>_<NNNN>.jpg at 250x250, pairs.txt in the View 2 format, lfw_landmark.txt), so every
real-data code path runs on it. The faces come from preprocess/_procedural_faces.py. The same seed gives
the same bytes, whatever the number of workers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.cli import CliParser, UserError, cpu_count, log, positive, progress, run_cli

MARKER = ".facetrain-synthetic.json"  # marks a folder this command may overwrite
FOLDS = 10
LFW_SIZE = (250, 250)
_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ra",
    "ven",
    "dor",
    "el",
    "sa",
    "tin",
    "bru",
    "no",
    "za",
    "fe",
    "lia",
    "gor",
    "an",
    "ti",
    "mel",
    "os",
    "ru",
    "be",
    "ca",
    "dri",
    "vo",
    "ni",
    "ste",
    "ja",
    "ha",
    "ler",
    "quin",
)


@dataclass(frozen=True)
class Task:
    """One identity's photographs, rendered by one worker call."""

    kind: str  # "vggface2" | "lfw"
    number: int  # global identity number: seeds the appearance, disjoint between the two sets
    name: str
    files: tuple[str, ...]  # relative paths under the image root


def make_names(rng: np.random.Generator, count: int) -> list[str]:
    """Unique `First_Last` names for LFW identities (no spaces: pairs.txt splits on whitespace)."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        parts = ["".join(rng.choice(_SYLLABLES, int(rng.integers(2, 4)))).capitalize() for _ in range(2)]
        name = "_".join(parts)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def plan(args: argparse.Namespace) -> tuple[list[Task], list[Task], list[str]]:
    """Identities, their file names and the LFW names; everything random here comes from the seed."""
    rng = np.random.default_rng([args.seed, 1])
    vgg = []
    for i in range(args.identities):
        ident = f"n{i + 1:06d}"
        files = []
        for j in range(args.images_per_identity):
            face = 1 if rng.uniform() < 0.85 else int(rng.integers(2, 4))  # NNNN_NN: image, face in it
            files.append(f"{ident}/{j + 1:04d}_{face:02d}.jpg")
        vgg.append(Task("vggface2", i, ident, tuple(files)))
    names = make_names(rng, args.lfw_identities + args.identities)
    lfw_names = sorted(names[args.identities :])
    vgg_names = names[: args.identities]
    lfw = []
    for k, name in enumerate(lfw_names):
        count = int(rng.integers(3, 12))
        files = tuple(f"{name}/{name}_{j + 1:04d}.jpg" for j in range(count))
        lfw.append(Task("lfw", args.identities + k, name, files))
    return vgg, lfw, vgg_names


def make_pairs(
    lfw: list[Task], per_fold: int | None, rng: np.random.Generator
) -> tuple[int, list[list[str]]]:
    """View 2 style: 10 identity-disjoint folds, each with `per_fold` same and `per_fold` different pairs."""
    groups = [lfw[f::FOLDS] for f in range(FOLDS)]
    same_avail = min(sum(len(t.files) * (len(t.files) - 1) // 2 for t in g) for g in groups)
    # Different-person pairs are drawn until there are n distinct ones: n must not exceed how many
    # exist, or the drawing never ends (two identities of 3 images each give only 9).
    diff_avail = min(
        sum(len(a.files) * len(b.files) for i, a in enumerate(g) for b in g[i + 1 :]) for g in groups
    )
    avail = min(same_avail, diff_avail)
    n = min(300, avail) if per_fold is None else per_fold
    if n > avail:
        kind = "same-person" if same_avail <= diff_avail else "different-person"
        raise UserError(
            f"--pairs-per-fold {n}: the smallest fold has only {avail} {kind} pairs "
            f"(use more --lfw-identities or fewer pairs)"
        )
    lines: list[list[str]] = []
    for g in groups:
        same = [
            (t.name, i + 1, j + 1) for t in g for i in range(len(t.files)) for j in range(i + 1, len(t.files))
        ]
        picked = [same[k] for k in sorted(rng.choice(len(same), n, replace=False))]
        lines += [[name, str(i), str(j)] for name, i, j in picked]
        diff: set[tuple[str, int, str, int]] = set()
        while len(diff) < n:
            a, b = sorted(rng.choice(len(g), 2, replace=False))
            ta, tb = g[a], g[b]
            diff.add(
                (
                    ta.name,
                    int(rng.integers(1, len(ta.files) + 1)),
                    tb.name,
                    int(rng.integers(1, len(tb.files) + 1)),
                )
            )
        lines += [[a, str(i), b, str(j)] for a, i, b, j in sorted(diff)]
    return n, lines


# Worker side: one Photographer per process (its noise bank is built once).
_STATE: dict[str, object] = {}


def _init_worker(seed: int, out: str) -> None:
    import cv2

    from preprocess._procedural_faces import Photographer

    cv2.setNumThreads(1)
    _STATE.update(photographer=Photographer(seed), seed=seed, out=Path(out))


def render(task: Task) -> list[tuple[str, list[float], list[float]]]:
    """Draw one identity's photographs, write them; return (relative path, landmarks, box) per image."""
    from preprocess._procedural_faces import make_identity

    seed, out, ph = _STATE["seed"], _STATE["out"], _STATE["photographer"]
    ident = make_identity(np.random.default_rng([seed, 2, task.number]))
    image_root = out / task.kind / ("train" if task.kind == "vggface2" else "lfw")
    (image_root / task.name).mkdir(parents=True, exist_ok=True)
    rows = []
    for j, rel in enumerate(task.files):
        rng = np.random.default_rng([seed, 3, task.number, j])
        if task.kind == "vggface2":  # loose crops of varying size and framing
            w = int(rng.integers(180, 401))
            size = (w, int(w * rng.uniform(1.0, 1.3)))
            eye = w * rng.uniform(0.17, 0.27)
            args = dict(
                eye_px=eye, angle_sd=13.0, shift_sd=(0.06 * w, 0.05 * size[1]), centre_frac=(0.5, 0.5)
            )
        else:  # LFW: 250x250, face roughly centred, a little smaller and less rotated
            size = LFW_SIZE
            args = dict(
                eye_px=rng.uniform(34, 48), angle_sd=9.0, shift_sd=(6.0, 6.0), centre_frac=(0.5, 0.48)
            )
        jpg, landmarks, box = ph.photo(ident, rng, size, **args)
        (image_root / rel).write_bytes(jpg)
        rows.append((rel, landmarks.ravel().tolist(), box.tolist()))
    return rows


def _prepare(out: Path, subs: tuple[str, ...]) -> None:
    """Fresh DIR/<sub> folders; refuse to clear one this command did not make (it may be real data)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out exists and is not a folder")
    for sub in subs:  # check them all before clearing any
        path = out / sub
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: exists and is not a folder")
        if path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file():
            raise UserError(
                f"{path}: not empty and not made by preprocess/synthetic.py; choose another --out"
            )
    for sub in subs:
        path = out / sub
        if path.exists():
            shutil.rmtree(path)
        try:
            path.mkdir(parents=True)
        except OSError as err:
            raise UserError(f"{path}: cannot create the output folder ({err.strerror})") from None


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def generate(args: argparse.Namespace) -> dict[str, object]:
    out = Path(args.out)
    vgg, lfw, vgg_names = plan(args)
    n_pairs, pair_lines = make_pairs(lfw, args.pairs_per_fold, np.random.default_rng([args.seed, 4]))
    settings = {k: getattr(args, k) for k in ("identities", "images_per_identity", "lfw_identities", "seed")}
    _prepare(out, ("vggface2", "lfw"))
    for sub in ("vggface2", "lfw"):
        (out / sub / MARKER).write_text(json.dumps(settings) + "\n", encoding="utf-8")

    tasks = sorted(vgg + lfw, key=lambda t: -len(t.files))  # long tasks first: better load balance
    total = sum(len(t.files) for t in tasks)
    results: dict[tuple[str, str], list] = {}
    start = time.perf_counter()
    workers = max(1, min(args.workers, len(tasks)))
    # forkserver, not fork: a parent that already runs OpenCV's or a runtime's thread pool (a test
    # process, a notebook) hands a forked child locks that no thread will release: it hangs
    ctx = multiprocessing.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")
    with progress("synthetic faces") as bar:
        job = bar.add_task("render", total=total)
        if workers == 1:
            _init_worker(args.seed, str(out))
            for t in tasks:
                results[(t.kind, t.name)] = render(t)
                bar.advance(job, len(t.files))
        else:
            with ctx.Pool(workers, _init_worker, (args.seed, str(out))) as pool:
                for t, rows in zip(tasks, pool.imap(render, tasks, chunksize=1)):
                    results[(t.kind, t.name)] = rows
                    bar.advance(job, len(t.files))
    seconds = time.perf_counter() - start

    # VGGFace2 metadata, in identity then file order (as the real lists are sorted).
    root = out / "vggface2"
    rows = [r for t in vgg for r in results[("vggface2", t.name)]]
    _write(root / "train_list.txt", [rel for rel, _, _ in rows])
    _write(
        root / "bb_landmark" / "loose_landmark_train.csv",
        ["NAME_ID,P1X,P1Y,P2X,P2Y,P3X,P3Y,P4X,P4Y,P5X,P5Y"]
        + [rel[:-4] + "," + ",".join(f"{v:.2f}" for v in lm) for rel, lm, _ in rows],
    )
    _write(
        root / "bb_landmark" / "loose_bb_train.csv",
        ["NAME_ID,X,Y,W,H"]
        + [rel[:-4] + "," + ",".join(str(int(round(v))) for v in box) for rel, _, box in rows],
    )
    gender_rng = np.random.default_rng([args.seed, 5])
    _write(
        root / "meta" / "identity_meta.csv",
        ["Class_ID, Name, Sample_Num, Flag, Gender"]
        + [
            f'{t.name}, "{name}", {len(t.files)}, 1, {"m" if gender_rng.uniform() < 0.5 else "f"}'
            for t, name in zip(vgg, vgg_names)
        ],
    )

    # LFW: landmarks relative to DIR/lfw/lfw/, pairs in View 2 format.
    lroot = out / "lfw"
    lrows = [r for t in lfw for r in results[("lfw", t.name)]]
    _write(
        lroot / "lfw_landmark.txt", [rel + "\t" + " ".join(f"{v:.2f}" for v in lm) for rel, lm, _ in lrows]
    )
    _write(lroot / "pairs.txt", [f"{FOLDS}\t{n_pairs}"] + ["\t".join(line) for line in pair_lines])
    _write(lroot / "lfw-names.txt", [f"{t.name}\t{len(t.files)}" for t in lfw])
    return {
        "out": str(out),
        "vggface2_identities": len(vgg),
        "vggface2_images": len(rows),
        "lfw_identities": len(lfw),
        "lfw_images": len(lrows),
        "pairs_per_fold": n_pairs,
        "folds": FOLDS,
        "seconds": round(seconds, 2),
        "images_per_second": round(total / seconds, 1),
        "workers": workers,
        "seed": args.seed,
    }


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="preprocess/synthetic.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (gets vggface2/ and lfw/)")
    p.add_argument(
        "--identities", type=positive, default=500, help="VGGFace2-layout identities (default 500)"
    )
    p.add_argument("--images-per-identity", type=positive, default=20, help="images per training identity")
    p.add_argument(
        "--lfw-identities",
        type=positive,
        default=150,
        help="LFW-layout identities, disjoint from the training ones (at least 20)",
    )
    p.add_argument(
        "--pairs-per-fold",
        type=positive,
        default=None,
        help="same (and different) pairs per fold; default min(300, what the identities allow)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workers",
        type=positive,
        default=cpu_count(),
        help="processes (default: the CPUs this process may use)",
    )
    return p


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.lfw_identities < 2 * FOLDS:
        raise UserError(
            f"--lfw-identities {args.lfw_identities}: need at least {2 * FOLDS} "
            f"(two per fold for different-person pairs)"
        )
    summary = generate(args)
    log(
        f"wrote {summary['vggface2_images']} VGGFace2-layout and {summary['lfw_images']} LFW-layout images "
        f"to {summary['out']} in {summary['seconds']} s ({summary['images_per_second']} img/s)"
    )
    print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
