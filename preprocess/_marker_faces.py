"""Marker faces with known landmarks (a coloured disc per point), for the alignment tests and the bench.

Each landmark is drawn as a disc of its own colour, so a test can find where each point landed in an
aligned crop (and notice a mirror image: the left-eye colour would sit at the right eye). The rest of
the image is smooth noise plus a skin ellipse, which keeps JPEG sizes and decode costs realistic.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from preprocess.align import template

# BGR colours of the 5 markers: left eye, right eye, nose, left mouth corner, right mouth corner.
MARKER_BGR = ((0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 0, 255))


def random_landmarks(
    width: int, height: int, rng: np.random.Generator, eye_px: tuple[float, float], max_angle: float = 25.0
) -> np.ndarray:
    """Template points under a random similarity: eye distance in eye_px, rotation within +-max_angle."""
    base = template((112, 112))
    eye = float(np.linalg.norm(base[1] - base[0]))
    scale = rng.uniform(*eye_px) / eye
    angle = math.radians(rng.uniform(-max_angle, max_angle))
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = (base - base.mean(0)) @ rot.T
    margin = np.abs(pts).max(0) + 2
    centre = [rng.uniform(margin[0], width - margin[0]), rng.uniform(margin[1], height - margin[1])]
    return pts + np.asarray(centre)


def face_image(width: int, height: int, landmarks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A BGR uint8 image with coloured discs at the landmarks."""
    noise = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    image = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    # Keep the background away from the saturated marker colours so markers are unambiguous.
    image = (70 + image.astype(np.uint16) * 115 // 255).astype(np.uint8)
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eye = float(np.linalg.norm(pts[1] - pts[0]))
    centre = pts.mean(0)
    angle = math.degrees(math.atan2(pts[1, 1] - pts[0, 1], pts[1, 0] - pts[0, 0]))
    axes = (int(eye * 1.1), int(eye * 1.45))
    cv2.ellipse(
        image, (int(centre[0]), int(centre[1])), axes, angle, 0, 360, (150, 170, 200), -1, cv2.LINE_AA
    )
    radius = max(2, int(round(eye * 0.12)))
    shift = 4  # sub-pixel disc centres
    for (x, y), colour in zip(pts, MARKER_BGR):
        centre_fixed = (int(round(x * (1 << shift))), int(round(y * (1 << shift))))
        cv2.circle(image, centre_fixed, radius << shift, colour, -1, cv2.LINE_AA, shift)
    return image


def marker_centres(image: np.ndarray) -> np.ndarray:
    """The centroid (x, y) of each marker colour in a BGR image; NaN where a colour is absent."""
    img = image.astype(np.int16)
    out = np.full((5, 2), np.nan)
    for i, colour in enumerate(MARKER_BGR):
        mask = np.all(np.abs(img - np.asarray(colour, dtype=np.int16)) < 60, axis=2)
        ys, xs = np.nonzero(mask)
        if len(xs) >= 3:
            out[i] = (xs.mean(), ys.mean())
    return out


def write_jpeg(path: Path, image: np.ndarray, quality: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    path.write_bytes(data.tobytes())


def write_vggface2(
    root: Path,
    split: str = "train",
    identities: int = 4,
    per_identity: int = 5,
    size: tuple[int, int] = (200, 260),
    eye_px: tuple[float, float] = (40.0, 70.0),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """VGGFace2's layout: <split>/<id>/<file>.jpg, <split>_list.txt, bb_landmark/loose_landmark_<split>.csv.

    size is (width, height). Returns the landmarks by relative path.
    """
    rng = np.random.default_rng(seed)
    truth: dict[str, np.ndarray] = {}
    rows, listed = [], []
    for i in range(identities):
        for j in range(per_identity):
            rel = f"n{i + 1:06d}/{j + 1:04d}_01.jpg"
            pts = random_landmarks(size[0], size[1], rng, eye_px)
            write_jpeg(root / split / rel, face_image(size[0], size[1], pts, rng))
            truth[rel] = pts
            listed.append(rel)
            rows.append(",".join([f'"{rel[:-4]}"', *(f"{v:.3f}" for v in pts.reshape(-1))]))
    (root / f"{split}_list.txt").write_text("\n".join(listed) + "\n")
    lm = root / "bb_landmark" / f"loose_landmark_{split}.csv"
    lm.parent.mkdir(parents=True, exist_ok=True)
    header = "NAME_ID," + ",".join(f"P{k}X,P{k}Y" for k in range(1, 6))
    lm.write_text(header + "\n" + "\n".join(rows) + "\n")
    return truth


def write_lfw(
    root: Path, identities: int = 6, per_identity: int = 3, size: int = 150, seed: int = 1
) -> dict[str, np.ndarray]:
    """LFW's layout: lfw/<Name>/<Name>_<NNNN>.jpg, lfw_landmark_150.txt and a 2-fold pairs.txt."""
    rng = np.random.default_rng(seed)
    names = [f"Person_{chr(65 + i)}" for i in range(identities)]
    truth: dict[str, np.ndarray] = {}
    lines = []
    for name in names:
        for j in range(1, per_identity + 1):
            rel = f"{name}/{name}_{j:04d}.jpg"
            pts = random_landmarks(size, size, rng, (30.0, 45.0), max_angle=10.0)
            write_jpeg(root / "lfw" / rel, face_image(size, size, pts, rng))
            truth[rel] = pts
            lines.append(rel + "\t" + " ".join(f"{v:.2f}" for v in pts.reshape(-1)))
    (root / "lfw_landmark_150.txt").write_text("\n".join(lines) + "\n")
    pairs = ["2\t3"]
    for fold in range(2):
        for k in range(3):
            pairs.append(f"{names[(fold * 3 + k) % identities]}\t1\t2")
        for k in range(3):
            a, b = names[(fold + k) % identities], names[(fold + k + 1) % identities]
            pairs.append(f"{a}\t{k % per_identity + 1}\t{b}\t{(k + 1) % per_identity + 1}")
    (root / "pairs.txt").write_text("\n".join(pairs) + "\n")
    return truth
