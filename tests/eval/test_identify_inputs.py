"""eval/identify.py's inputs that are not what it expects: detected faces whose landmarks cannot be
aligned, gallery files that are not ours, a camera that is not there."""

from __future__ import annotations

import numpy as np

from eval.identification import faces
from preprocess.align import template
from preprocess.detect import Face


def test_a_detected_face_with_degenerate_landmarks_is_left_out_with_a_warning(monkeypatch, capsys) -> None:
    good = template() + 40.0
    detected = [
        Face(box=(40.0, 40.0, 112.0, 112.0), score=0.99, landmarks=good),
        Face(box=(10.0, 10.0, 30.0, 30.0), score=0.98, landmarks=np.full((5, 2), 20.0)),
        Face(box=(150.0, 10.0, 80.0, 80.0), score=0.97, landmarks=good + [150.0, 0.0]),  # past the edge
    ]
    monkeypatch.setattr(faces, "detect_faces", lambda rgb: detected)
    found = faces.find_faces(np.zeros((200, 240, 3), np.uint8), (112, 112), "photo.jpg")
    assert [f.face for f in found] == detected[:1] and found[0].crop.shape == (112, 112, 3)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: photo.jpg: the face at x,y,w,h ") for line in err)
    assert "landmarks_degenerate" in err[0] and "10,10,30,30" in err[0]
    assert "landmarks_outside_image (points outside the 240x200 image)" in err[1]
