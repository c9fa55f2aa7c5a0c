"""Identification on real LFW through the commands a user runs: `eval/identify.py enrol` on a folder
of people, `search` on their other photos, scored from search's detections.jsonl.

    python -m bench.identify_commands --model CKPT|M.onnx --work DIR [--people 300 --root ../shared/data/lfw]

Split: eval/identification/lfw_figures.py's (the first photo of each person with two or more is
enrolled, their other photos are searched), for the first --people of those people by name; the
photos are linked into DIR/gallery/<person>/ and DIR/probes/. The gallery is enrolled twice: with the
default face policy (largest-central) and with --single-face-only. The probes are searched once,
against the default gallery, with every person ranked (--top-k = the gallery size); a probe counts at
rank 1 when, of its faces, the one pick_face chooses (LFW centres the named person) has its person
first, and a probe without a face is a miss. The --single-face-only gallery's rank-1 comes from the
same ranking, its left-out people removed: exact, since a person enrolled under both policies has
the same template (checked).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np

from common.cli import CliParser, UserError, run_cli
from eval import identify
from eval.identification.gallery import load_gallery
from eval.identification.lfw_figures import lfw_split
from models.load import add_model_arguments
from preprocess.face_choice import pick_face

DEFAULT_LFW = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lfw"


def link_photos(images: Path, people: int, work: Path) -> list[tuple[str, Path]]:
    """The gallery folder and the probes folder under `work`; (person, probe link) for each probe."""
    gallery, probes, _, names = lfw_split(images)
    if work.exists() and any(work.iterdir()):
        raise UserError(f"{work}: not empty (give a new --work folder)")
    for person, photo in gallery[:people]:
        (work / "gallery" / names[person]).mkdir(parents=True)
        (work / "gallery" / names[person] / photo.name).symlink_to(photo.resolve())
    (work / "probes").mkdir()
    linked = []
    for person, photo in probes:
        if person < people:
            (work / "probes" / photo.name).symlink_to(photo.resolve())
            linked.append((names[person], work / "probes" / photo.name))
    return linked


def rank1(detections: Path, probes: list[tuple[str, Path]], left_out: set[str]) -> float:
    """Share of probes whose chosen face ranks their person first, people in `left_out` removed."""
    faces = defaultdict(list)
    for line in detections.read_text().splitlines():
        record = json.loads(line)
        faces[record["source"]].append(SimpleNamespace(box=record["box"], top=record["top"]))
    hits = 0
    for person, path in probes:
        chosen = pick_face(faces.get(str(path), []), cv2.imread(str(path)).shape)
        ranking = [] if chosen is None else [name for name, _ in chosen.top if name not in left_out]
        hits += bool(ranking) and ranking[0] == person
    return hits / len(probes)


def run(argv: list[str] | None = None) -> int:
    parser = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, runtime=False)
    parser.add_argument("--work", type=Path, required=True, help="a new folder for the photos and outputs")
    parser.add_argument("--people", type=int, default=300, help="people in the gallery (default 300)")
    parser.add_argument("--root", type=Path, default=DEFAULT_LFW, help="folder holding lfw/")
    parser.add_argument("--workers", type=int, default=2, help="detection processes")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    work = args.work
    probes = link_photos(args.root / "lfw", args.people, work)
    model = ["--model", str(args.model), "--workers", str(args.workers)]
    enrol = ["enrol", "--gallery", str(work / "gallery"), *model]
    search = ["search", "--gallery", str(work / "largest.npz"), str(work / "probes"), *model]
    with contextlib.redirect_stdout(sys.stderr):  # the commands' own lines; ours is the JSON below
        identify.run([*enrol, "--out", str(work / "largest.npz")])
        identify.run([*enrol, "--out", str(work / "single.npz"), "--single-face-only"])
        largest, single = load_gallery(work / "largest.npz"), load_gallery(work / "single.npz")
        search += [
            "--out",
            str(work / "found"),
            "--top-k",
            str(len(largest.names)),
            "--report-limit",
            "100000",
        ]
        identify.run(search)
    kept = [largest.names.index(name) for name in single.names]
    assert np.allclose(largest.templates[kept], single.templates, atol=1e-5), "templates differ"
    left_out = set(largest.names) - set(single.names)
    detections = work / "found" / "detections.jsonl"
    figures = {
        "people": len(largest.names),
        "probes": len(probes),
        "faces": len(detections.read_text().splitlines()),
        "rank1_largest_central": round(rank1(detections, probes, set()), 4),
        "people_single_face_only": len(single.names),
        "rank1_single_face_only": round(rank1(detections, probes, left_out), 4),
        "model": str(args.model),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(figures))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
