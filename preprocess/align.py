"""5-point face alignment: a least-squares similarity transform onto the standard template.

The transform is Umeyama's closed form restricted to rotations (no reflection). Inputs whose best
fit would need a reflection (eyes swapped) or whose points are (nearly) collinear are refused by
`check_geometry`, because any crop made from them is not a face in the template's pose.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from shards.format import scaled_template

# Below this ratio of the landmarks' smaller to larger spread, the points lie on a line.
_COLLINEAR_RATIO = 0.02
# Below this spread (source pixels) the points coincide.
_MIN_SPREAD_PX = 1.0


@functools.lru_cache(maxsize=16)
def _template(image_size: tuple[int, int]) -> np.ndarray:
    tpl = np.asarray(scaled_template(image_size), dtype=np.float64)
    tpl.flags.writeable = False  # shared between calls
    return tpl


def template(image_size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """The 5x2 template (x, y) for an (H, W) output."""
    return _template(tuple(image_size))


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix of the rotation+uniform scale+translation mapping src onto dst in least squares.

    Never a reflection. In 2-D the fit has a closed form: with both point sets centred, the matrix
    [[a, -b], [b, a]] minimizing the squared error has a = sum(x*u + y*v) / sum(x^2 + y^2) and
    b = sum(x*v - y*u) / sum(x^2 + y^2). This is the same optimum as Umeyama's SVD solution with
    the reflection excluded, at a fraction of the cost (it runs once per image in the offline stage).
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    var = float((sc**2).sum())
    if var > 0:
        a = float((sc[:, 0] * dc[:, 0] + sc[:, 1] * dc[:, 1]).sum()) / var
        b = float((sc[:, 0] * dc[:, 1] - sc[:, 1] * dc[:, 0]).sum()) / var
    else:
        a, b = 1.0, 0.0
    linear = np.array([[a, -b], [b, a]])
    matrix = np.empty((2, 3))
    matrix[:, :2] = linear
    matrix[:, 2] = mu_d - linear @ mu_s
    return matrix


def transform_scale(matrix: np.ndarray) -> float:
    """Output pixels per source pixel of a similarity matrix."""
    return float(math.hypot(matrix[0, 0], matrix[1, 0]))


def check_geometry(landmarks: np.ndarray, image_size: tuple[int, int] = (112, 112)) -> tuple[str, str] | None:
    """None when the 5 points can be aligned; else (reason, detail) for rejects.jsonl."""
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    centred = pts - pts.mean(0)
    # The points' spread along their two principal axes: the square roots of the eigenvalues of
    # the 2x2 scatter matrix (the singular values of the centred points), in closed form.
    sxx, syy = float((centred[:, 0] ** 2).sum()), float((centred[:, 1] ** 2).sum())
    sxy = float((centred[:, 0] * centred[:, 1]).sum())
    half, root = (sxx + syy) / 2, math.sqrt(max(0.0, ((sxx - syy) / 2) ** 2 + sxy**2))
    spread = (math.sqrt(half + root), math.sqrt(max(0.0, half - root)))
    if spread[0] < _MIN_SPREAD_PX:
        return "landmarks_degenerate", "the five points coincide"
    if spread[1] < _COLLINEAR_RATIO * spread[0]:
        return "landmarks_collinear", f"points lie on a line (spread ratio {spread[1] / spread[0]:.4f})"
    dst = template(image_size)
    cov = (dst - dst.mean(0)).T @ centred
    if cov[0, 0] * cov[1, 1] - cov[0, 1] * cov[1, 0] < 0:
        return (
            "landmarks_reflected",
            "the best fit to the template is a mirror image (eyes or mouth swapped?)",
        )
    return None


def reduction_for(scale: float, choices: tuple[int, ...] = (8, 4, 2)) -> int:
    """The largest JPEG DCT reduction that keeps every source pixel the output needs.

    `scale` is output pixels per source pixel; a reduction r keeps scale * r <= 1, i.e. the reduced
    image still has at least one pixel per output pixel.
    """
    for r in choices:
        if scale * r <= 1.0:
            return r
    return 1


def scale_points(points: np.ndarray, src_size: tuple[int, int], dst_size: tuple[int, int]) -> np.ndarray:
    """Map pixel-centre coordinates from a (W, H) image onto the same image resampled to (W', H')."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    fx, fy = dst_size[0] / src_size[0], dst_size[1] / src_size[1]
    return np.stack([(pts[:, 0] + 0.5) * fx - 0.5, (pts[:, 1] + 0.5) * fy - 0.5], axis=1)


def warp(
    image: np.ndarray,
    landmarks: np.ndarray,
    image_size: tuple[int, int] = (112, 112),
    matrix: np.ndarray | None = None,
) -> np.ndarray:
    """The aligned (H, W) crop of `image` (any channel order; it is kept); `matrix` when already fitted."""
    if matrix is None:
        matrix = similarity_transform(landmarks, template(image_size))
    height, width = image_size
    return cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
