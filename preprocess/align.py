"""5-point face alignment: a least-squares similarity transform onto the standard template.

The transform is Umeyama's closed form restricted to rotations (no reflection). `check_landmarks`
is the one test every caller (build_shards' jobs, eval/ijb.py, eval/identify.py's faces) runs
before aligning: points that are not finite, lie outside the image, coincide, lie on a line, put
the two eyes on one spot, need a reflection (eyes swapped) or a scale no face has are refused with
a (reason, detail) pair, because any crop made from them is not a face in the template's pose.
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
# Below this ratio of the eye distance to the points' larger spread, the eyes are one point (a
# profile face still keeps about a tenth of the frontal ratio, 0.9).
_MIN_EYE_RATIO = 0.02
# Output pixels per source pixel (for a 112-pixel high output) outside this range: eyes under 2
# source pixels apart, or 17,000 apart (landmarks in other units than pixels).
_ZOOM_RANGE = (1 / 500, 20.0)
# A face cut by the photo's edge: detectors (ours included) put a point up to ~0.15 eye distances
# outside the image (6 of 472 faces on 400 LFW photos); the crop pads there. Farther is a bad point.
_OUTSIDE_EYES = 0.25


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
    the reflection excluded, at a fraction of the cost; plain floats, because it runs once per
    image in the offline stage and NumPy's per-call overhead would dominate on five points.
    """
    a, b, tx, ty = _fit(_points(src), _points(dst))
    return np.array([[a, -b, tx], [b, a, ty]])


def _points(points) -> list[tuple[float, float]]:
    flat = np.asarray(points, dtype=np.float64).reshape(-1).tolist()
    return list(zip(flat[0::2], flat[1::2]))


def _centred(points: list[tuple[float, float]]) -> tuple[float, float, list[tuple[float, float]]]:
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return mx, my, [(x - mx, y - my) for x, y in points]


def _fit(src: list[tuple[float, float]], dst: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    """(a, b, tx, ty) of the least-squares similarity x' = a x - b y + tx, y' = b x + a y + ty."""
    sx, sy, sc = _centred(src)
    dx, dy, dc = _centred(dst)
    var = sum(x * x + y * y for x, y in sc)
    if var > 0:
        a = sum(x * u + y * v for (x, y), (u, v) in zip(sc, dc)) / var
        b = sum(x * v - y * u for (x, y), (u, v) in zip(sc, dc)) / var
    else:
        a, b = 1.0, 0.0
    return a, b, dx - (a * sx - b * sy), dy - (b * sx + a * sy)


@functools.lru_cache(maxsize=8)
def _centred_template(image_size: tuple[int, int]) -> list[tuple[float, float]]:
    return _centred(_points(template(image_size)))[2]


def transform_scale(matrix: np.ndarray) -> float:
    """Output pixels per source pixel of a similarity matrix."""
    return float(math.hypot(matrix[0, 0], matrix[1, 0]))


def check_landmarks(
    landmarks: np.ndarray,
    image_size: tuple[int, int] = (112, 112),
    source_wh: tuple[int, int] | None = None,
) -> tuple[str, str] | None:
    """None when the 5 points can be aligned onto the (H, W) template; else (reason, detail) for
    rejects.jsonl and reports. `source_wh`: the (width, height) of the image they lie in, when known."""
    points = _points(landmarks)
    if not all(math.isfinite(v) for xy in points for v in xy):
        return "landmarks_nan", "a landmark is NaN or infinite"
    if source_wh is not None and not _inside(points, source_wh, _OUTSIDE_EYES * math.dist(*points[:2])):
        return "landmarks_outside_image", f"points outside the {source_wh[0]}x{source_wh[1]} image"
    _, _, centred = _centred(points)
    # The points' spread along their two principal axes: the square roots of the eigenvalues of
    # the 2x2 scatter matrix (the singular values of the centred points), in closed form.
    sxx, syy = sum(x * x for x, _ in centred), sum(y * y for _, y in centred)
    sxy = sum(x * y for x, y in centred)
    half, root = (sxx + syy) / 2, math.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
    spread = (math.sqrt(half + root), math.sqrt(max(0.0, half - root)))
    if spread[0] < _MIN_SPREAD_PX:
        return "landmarks_degenerate", "the five points coincide"
    if spread[1] < _COLLINEAR_RATIO * spread[0]:
        return "landmarks_collinear", f"points lie on a line (spread ratio {spread[1] / spread[0]:.4f})"
    eyes = math.dist(points[0], points[1])
    if eyes < _MIN_EYE_RATIO * spread[0]:
        return "landmarks_degenerate", f"the two eyes are {eyes:.2g} pixels apart"
    # A mirror image: the cross-covariance with the template has a negative determinant.
    tpl = _centred_template(tuple(image_size))
    c00 = sum(u * x for (u, _), (x, _) in zip(tpl, centred))
    c01 = sum(u * y for (u, _), (_, y) in zip(tpl, centred))
    c10 = sum(v * x for (_, v), (x, _) in zip(tpl, centred))
    c11 = sum(v * y for (_, v), (_, y) in zip(tpl, centred))
    if c00 * c11 - c01 * c10 < 0:
        return (
            "landmarks_reflected",
            "the best fit to the template is a mirror image (eyes or mouth swapped?)",
        )
    a, b, _, _ = _fit(points, _points(template(image_size)))
    zoom = math.hypot(a, b) * 112 / image_size[0]  # the template scales with the output's height
    if not _ZOOM_RANGE[0] <= zoom <= _ZOOM_RANGE[1]:
        return "landmarks_scale", f"aligning scales the face by {zoom:.3g} (no face is that size in pixels)"
    return None


def _inside(points: list[tuple[float, float]], source_wh: tuple[int, int], margin: float) -> bool:
    width, height = source_wh
    return all(-margin <= x <= width + margin and -margin <= y <= height + margin for x, y in points)


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
    if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return _warp_via_4_channels(image, matrix, (width, height))
    return cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def _warp_via_4_channels(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.warpAffine's bilinear result for a 3-channel uint8 image, about twice as fast: OpenCV
    vectorizes the 4-channel case and not the 3-channel one, so the part of the image the output
    reads (every pixel the inverse-mapped output touches, plus a margin) is warped as BGRA and the
    alpha dropped. The same source coordinates: the crop's offset is taken off the inverse map."""
    width, height = size
    inverse = cv2.invertAffineTransform(matrix)
    (a, b, c), (d, e, f) = inverse.tolist()  # plain floats: NumPy's per-call cost would dominate
    xs = [a * x + b * y + c for x in (0, width - 1) for y in (0, height - 1)]
    ys = [d * x + e * y + f for x in (0, width - 1) for y in (0, height - 1)]
    h, w = image.shape[:2]
    x0, y0 = max(0, math.floor(min(xs)) - 2), max(0, math.floor(min(ys)) - 2)
    x1, y1 = min(w, math.ceil(max(xs)) + 3), min(h, math.ceil(max(ys)) + 3)
    if x0 >= x1 or y0 >= y1:  # the output lies wholly outside the image
        return np.zeros((height, width, 3), np.uint8)
    inverse[:, 2] -= (x0, y0)
    part = cv2.cvtColor(image[y0:y1, x0:x1], cv2.COLOR_BGR2BGRA)
    out = cv2.warpAffine(
        part,
        inverse,
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return cv2.cvtColor(out, cv2.COLOR_BGRA2BGR)
