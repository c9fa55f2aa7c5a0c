"""preprocess/face_choice.py: the rule build_shards --detect and identify enrol share."""

from __future__ import annotations

import numpy as np
import pytest

from preprocess.detect import Face
from preprocess.face_choice import LARGEST_CENTRAL, SINGLE_FACE_ONLY, choose_face, pick_face

SHAPE = (200, 200, 3)


def _face(x: float, y: float, w: float, h: float) -> Face:
    return Face(box=(x, y, w, h), score=0.9, landmarks=np.zeros((5, 2)))


def test_pick_face_prefers_the_large_face_near_the_centre() -> None:
    centre_small = _face(80, 80, 40, 40)
    corner_big = _face(0, 0, 60, 60)  # larger, but its centre is 99 px from the image centre
    centre_big = _face(60, 60, 80, 80)
    assert pick_face([centre_small, corner_big], SHAPE) is centre_small
    assert pick_face([centre_small, corner_big, centre_big], SHAPE) is centre_big
    assert pick_face([], SHAPE) is None


def test_choose_face_by_policy() -> None:
    centre, corner = _face(60, 60, 80, 80), _face(0, 0, 30, 30)
    assert choose_face([corner, centre], SHAPE) == (centre, None)  # largest-central is the default
    assert choose_face([corner, centre], SHAPE, SINGLE_FACE_ONLY) == (None, "multiple_faces")
    assert choose_face([corner], SHAPE, SINGLE_FACE_ONLY) == (corner, None)
    for policy in (LARGEST_CENTRAL, SINGLE_FACE_ONLY):
        assert choose_face([], SHAPE, policy) == (None, "no_face")
    with pytest.raises(ValueError, match="largest-central, single-face-only"):
        choose_face([centre], SHAPE, "largest")
