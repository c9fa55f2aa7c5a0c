"""preprocess/_work.py, the per-image job: it opens only regular files (a FIFO that appears after
the walk is a reject, not a hang) and refuses an image too small to hold a face, in every mode."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from preprocess import _work

LANDMARKS = (38.3, 51.7, 73.5, 51.5, 56.0, 71.7, 41.5, 92.4, 70.7, 92.2)


def _job(path: Path, mode: str) -> _work.Job:
    return _work.Job(str(path), LANDMARKS if mode == "landmarks" else (), (112, 112), 90, mode=mode)


@pytest.mark.parametrize("mode", ["landmarks", "aligned"])
def test_a_fifo_is_a_reject_not_a_hang(tmp_path: Path, mode: str) -> None:
    os.mkfifo(tmp_path / "x.jpg")  # no writer: opening it for reading the plain way blocks for ever
    outcome = _work.run(_job(tmp_path / "x.jpg", mode))
    assert (outcome.jpeg, outcome.reason) == (None, "not_a_file")


@pytest.mark.parametrize("mode", ["landmarks", "aligned"])
@pytest.mark.parametrize(("size", "ext"), [(1, ".png"), (1, ".jpg"), (15, ".jpg"), (8, ".png")])
def test_an_image_too_small_for_a_face_is_a_reject(tmp_path: Path, mode: str, size: int, ext: str) -> None:
    path = tmp_path / f"x{ext}"
    path.write_bytes(cv2.imencode(ext, np.full((size, size, 3), 128, np.uint8))[1].tobytes())
    outcome = _work.run(_job(path, mode))
    assert (outcome.jpeg, outcome.reason) == (None, "image_too_small"), outcome
    assert outcome.detail == f"{size}x{size} pixels, a face needs 16"


def test_the_smallest_face_passes(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))[1].tobytes())
    assert _work.run(_job(path, "aligned")).jpeg is not None
