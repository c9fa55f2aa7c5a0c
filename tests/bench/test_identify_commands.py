"""bench/identify_commands.py's scoring: the chosen face of each probe, people left out of a gallery."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from bench.identify_commands import rank1


def test_rank1_scores_the_central_face_and_drops_left_out_people(tmp_path: Path) -> None:
    probes = []
    for name in ("ana", "bo", "cy"):
        path = tmp_path / f"{name}_0002.jpg"
        cv2.imwrite(str(path), np.zeros((150, 150, 3), np.uint8))
        probes.append((name, path))
    records = [
        (probes[0][1], [40, 40, 70, 70], [["ana", 0.9], ["bo", 0.2]]),  # ana's central face: right
        (probes[0][1], [0, 0, 30, 30], [["bo", 0.95], ["ana", 0.1]]),  # a face in the corner: ignored
        (probes[1][1], [40, 40, 70, 70], [["dee", 0.8], ["bo", 0.7]]),  # dee first: right only without dee
    ]  # cy: no face found, a miss
    detections = tmp_path / "detections.jsonl"
    lines = [json.dumps({"source": str(p), "box": box, "top": top}) for p, box, top in records]
    detections.write_text("\n".join(lines) + "\n")
    assert rank1(detections, probes, set()) == 1 / 3
    assert rank1(detections, probes, {"dee"}) == 2 / 3
