"""Which face of a photo is used: the one rule that `build_shards.py --detect` and
`eval/identify.py enrol` share.

Policies (the names a gallery records):
  largest-central   several faces: the largest one nearest the centre (pick_face); the default.
  single-face-only  several faces: the photo is not used (reason "multiple_faces").
A photo without a face is never used (reason "no_face").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

LARGEST_CENTRAL = "largest-central"
SINGLE_FACE_ONLY = "single-face-only"
POLICIES = (LARGEST_CENTRAL, SINGLE_FACE_ONLY)


class Boxed(Protocol):
    @property
    def box(self) -> tuple[float, float, float, float]: ...  # x, y, w, h in image pixels


F = TypeVar("F", bound=Boxed)


def pick_face(faces: Sequence[F], image_shape: tuple[int, ...]) -> F | None:
    """The largest face nearest the centre: box area minus twice its centre's squared distance
    from the image centre (pixels^2), so a big face wins unless it sits far off-centre."""
    if not faces:
        return None
    cy, cx = image_shape[0] / 2, image_shape[1] / 2

    def merit(face: F) -> float:
        x, y, w, h = face.box
        return w * h - 2.0 * ((x + w / 2 - cx) ** 2 + (y + h / 2 - cy) ** 2)

    return max(faces, key=merit)


def choose_face(
    faces: Sequence[F], image_shape: tuple[int, ...], policy: str = LARGEST_CENTRAL
) -> tuple[F | None, str | None]:
    """(the face to use, None), or (None, "no_face" | "multiple_faces") when the photo is not used."""
    if policy not in POLICIES:
        raise ValueError(f"face policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if not faces:
        return None, "no_face"
    if len(faces) > 1 and policy == SINGLE_FACE_ONLY:
        return None, "multiple_faces"
    return pick_face(faces, image_shape), None
