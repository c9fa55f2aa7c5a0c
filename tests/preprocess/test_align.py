"""Alignment: the similarity fit, marker faces back onto the template, no reflection, reduced decode."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from preprocess import _work, align
from preprocess._marker_faces import face_image, marker_centres, random_landmarks, write_jpeg


def _similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array(
        [[scale * math.cos(a), -scale * math.sin(a), tx], [scale * math.sin(a), scale * math.cos(a), ty]]
    )


def test_fit_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, size=(5, 2))
    known = _similarity(0.37, 23.0, 11.0, -4.0)
    dst = src @ known[:, :2].T + known[:, 2]
    np.testing.assert_allclose(align.similarity_transform(src, dst), known, atol=1e-9)
    assert align.transform_scale(known) == pytest.approx(0.37)


def test_fit_never_reflects_even_for_mirrored_points():
    tpl = align.template()
    mirrored = tpl.copy()
    mirrored[:, 0] = 200 - mirrored[:, 0]  # a mirror image: the best unconstrained fit is a reflection
    matrix = align.similarity_transform(mirrored, tpl)
    assert np.linalg.det(matrix[:, :2]) > 0
    assert align.check_landmarks(mirrored)[0] == "landmarks_reflected"
    swapped = tpl[[1, 0, 2, 4, 3]]  # left/right labels swapped
    assert align.check_landmarks(swapped)[0] == "landmarks_reflected"
    assert align.check_landmarks(tpl * 3 + 40) is None


def _face(eye_px: float, at=(200.0, 150.0)) -> np.ndarray:
    """The template scaled to eyes `eye_px` apart, centred near `at`."""
    tpl = align.template()
    return (tpl - tpl.mean(0)) * eye_px / (tpl[1, 0] - tpl[0, 0]) + at


DEGENERATE = {
    "nan": (np.where(np.eye(5, 2, dtype=bool), np.nan, _face(40)), "landmarks_nan"),
    "inf": (_face(40) + [[np.inf, 0], [0, 0], [0, 0], [0, 0], [0, 0]], "landmarks_nan"),
    "outside": (_face(40, at=(405.0, 150.0)), "landmarks_outside_image"),
    "negative": (_face(40, at=(-5.0, 150.0)), "landmarks_outside_image"),
    "coincide": (np.full((5, 2), 50.0), "landmarks_degenerate"),
    "collinear": (np.stack([np.linspace(10, 90, 5), np.linspace(20, 60, 5)], axis=1), "landmarks_collinear"),
    "eyes_on_one_spot": (_face(40)[[0, 0, 2, 3, 4]], "landmarks_degenerate"),
    "reflected": (_face(40)[[1, 0, 2, 4, 3]], "landmarks_reflected"),
    "tiny_face": (_face(1.5), "landmarks_scale"),
    "units_not_pixels": (_face(40) * 1000, "landmarks_scale"),  # no image size given: only the scale
}


def test_points_just_past_the_edge_are_a_cut_face_not_a_bad_one():
    """A face at the photo's edge: the detector puts an eye a few pixels outside; the crop pads."""
    edge = _face(40, at=(385.0, 150.0))  # the right eye ~5 px (0.12 eye distances) past x=400
    assert edge[:, 0].max() > 400
    assert align.check_landmarks(edge, (112, 112), (400, 300)) is None


@pytest.mark.parametrize("case", DEGENERATE)
def test_degenerate_points_are_refused(case):
    points, reason = DEGENERATE[case]
    source = None if case == "units_not_pixels" else (400, 300)
    bad = align.check_landmarks(points, (112, 112), source)
    assert bad is not None and bad[0] == reason and bad[1], case


@pytest.mark.parametrize("image_size", [(112, 112), (112, 96), (1024, 1024)])
def test_faces_that_can_be_aligned_pass(image_size):
    """Small, large, turned and near-profile faces (eyes a tenth of the frontal distance apart) pass."""
    assert align.check_landmarks(_face(4), image_size, (400, 300)) is None
    assert align.check_landmarks(_face(150), image_size, (400, 300)) is None
    assert (
        align.check_landmarks(
            _face(40, at=(0.0, 0.0)) @ [[0.8, 0.6], [-0.6, 0.8]] + (200, 150), image_size, (400, 300)
        )
        is None
    )
    profile = _face(40)
    profile[1] = profile[0] + [4, 0]
    assert align.check_landmarks(profile, image_size, (400, 300)) is None
    assert align.check_landmarks(_face(20, at=(20.0, 16.0)), image_size, (40, 32)) is None


@pytest.mark.parametrize("image_size", [(112, 112), (112, 96), (56, 48)])
def test_warp_is_opencvs_bilinear_warp(image_size):
    """The 4-channel fast path gives cv2.warpAffine's pixels (the crop's offset may move a sample
    point across a 1/32-pixel rounding step: at most 1 level, rarely), faces at the border, partly or
    wholly outside the image, and small and large sources included."""
    import cv2

    rng = np.random.default_rng(7)
    rare = 0
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(30, 500, 2))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pts = align.template(image_size) * rng.uniform(0.2, 4) + rng.uniform(-200, max(h, w), 2)
        matrix = align.similarity_transform(pts, align.template(image_size))
        expected = cv2.warpAffine(
            image,
            matrix,
            image_size[::-1],
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        got = align.warp(image, pts, image_size, matrix)
        assert got.shape == expected.shape and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - expected)
        assert diff.max() <= 1
        rare += int((diff > 0).sum())
    assert rare <= 1e-3 * 60 * image_size[0] * image_size[1] * 3


@pytest.mark.parametrize("image_size", [(112, 112), (224, 224), (96, 96)])
def test_marker_face_lands_on_the_template(image_size):
    """A face drawn under a known similarity transform comes back onto the template within a pixel."""
    rng = np.random.default_rng(1)
    for _ in range(3):
        pts = random_landmarks(320, 280, rng, eye_px=(50, 90), max_angle=35)
        image = face_image(320, 280, pts, rng)
        crop = align.warp(image, pts, image_size)
        assert crop.shape == (*image_size, 3)
        found = marker_centres(crop)
        np.testing.assert_array_less(np.abs(found - align.template(image_size)), 1.0)


def _marker_job(tmp_path, width, height, eye_px, name="face.jpg", seed=2, reduce=True):
    rng = np.random.default_rng(seed)
    pts = random_landmarks(width, height, rng, eye_px=eye_px)
    path = tmp_path / name
    write_jpeg(path, face_image(width, height, pts, rng), quality=95)
    return _work.Job(str(path), tuple(pts.reshape(-1)), (112, 112), 95, reduce), path


@pytest.mark.parametrize(
    ("eye_px", "expected"), [((300, 320), 8), ((150, 160), 4), ((70, 80), 2), ((20, 30), 1)]
)
def test_reduced_decode_only_when_nothing_is_lost(tmp_path, eye_px, expected):
    """Large faces decode at 1/r scale (r*scale <= 1) and still land on the template within a pixel."""
    job, _ = _marker_job(tmp_path, 1100, 1000, eye_px)
    reduced, full = (
        _work.run(job),
        _work.run(_work.Job(job.path, job.landmarks, (112, 112), 95, reduce=False)),
    )
    assert reduced.reduction == expected and full.reduction == 1
    crops = [cv2.imdecode(np.frombuffer(o.jpeg, np.uint8), cv2.IMREAD_COLOR) for o in (reduced, full)]
    for crop in crops:
        np.testing.assert_array_less(np.abs(marker_centres(crop) - align.template()), 1.0)
    # Same picture either way: the reduced decode only drops detail finer than an output pixel.
    assert np.abs(crops[0].astype(int) - crops[1].astype(int)).mean() < 6.0


def test_jpeg_header_and_truncation(tmp_path):
    job, path = _marker_job(tmp_path, 333, 217, (40, 50))
    data = path.read_bytes()
    assert _work.jpeg_size(data) == (333, 217)
    assert _work.jpeg_complete(data) and _work.jpeg_complete(data + b"\x00\x00")
    assert not _work.jpeg_complete(data[: len(data) // 2])
    assert _work.jpeg_size(b"\x89PNG....") is None
    assert _work.jpeg_size(data[:20]) is None


def test_outcomes_for_bad_files(tmp_path):
    job, path = _marker_job(tmp_path, 300, 300, (60, 80))
    data = path.read_bytes()
    cases = {
        "missing.jpg": (None, "image_missing"),
        "truncated.jpg": (data[: len(data) * 2 // 3], "jpeg_truncated"),
        "garbage.jpg": (bytes(range(256)) * 8, "image_unreadable"),
        "header.jpg": (b"\xff\xd8\xff\xe0\x00\x02" + b"\x00" * 64, "jpeg_corrupt"),
        "empty.jpg": (b"", "image_unreadable"),
    }
    for name, (content, reason) in cases.items():
        target = tmp_path / name
        if content is not None:
            target.write_bytes(content)
        out = _work.run(_work.Job(str(target), job.landmarks, (112, 112), 95))
        assert out.jpeg is None and out.reason == reason, name
    outside = tuple(v + 1000 for v in job.landmarks)
    assert _work.run(_work.Job(job.path, outside, (112, 112), 95)).reason == "landmarks_outside_image"
    nan = (float("nan"), *job.landmarks[1:])
    assert _work.run(_work.Job(job.path, nan, (112, 112), 95)).reason == "landmarks_nan"
    one_eye = job.landmarks[:2] * 2 + job.landmarks[4:]
    assert _work.run(_work.Job(job.path, one_eye, (112, 112), 95)).reason == "landmarks_degenerate"
    png = tmp_path / "face.png"  # no JPEG header: the image size is known once decoded
    cv2.imwrite(str(png), cv2.imread(job.path))
    assert _work.run(_work.Job(str(png), outside, (112, 112), 95)).reason == "landmarks_outside_image"


def test_detected_landmarks_are_checked_like_a_files(tmp_path, monkeypatch):
    """--detect: the detector's points go through the same check (here a detector that puts the
    five points on one spot, and one that puts them outside the image)."""
    from preprocess.detect import Face

    job, _ = _marker_job(tmp_path, 300, 300, (60, 80))
    for points, reason in (
        (np.full((5, 2), 150.0), "landmarks_degenerate"),
        (_face(40, at=(305.0, 150.0)), "landmarks_outside_image"),
    ):
        face = Face(box=(100.0, 100.0, 100.0, 100.0), score=0.99, landmarks=points)
        monkeypatch.setattr(_work, "detector", lambda face=face: lambda rgb: [face])
        out = _work.run(_work.Job(job.path, (), (112, 112), 95, mode="detect"))
        assert out.jpeg is None and out.reason == reason
