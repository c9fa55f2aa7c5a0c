"""The per-image job run in the worker processes: read, check, decode (reduced when safe), align, encode.

Everything that can go wrong with one input becomes a (reason, detail) pair, never an exception, so a
bad file cannot stop a build.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass

import cv2
import numpy as np

from preprocess import align

_REDUCED_FLAG = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
# Landmark files are in stored-pixel coordinates, so EXIF rotation must not be applied.
_NO_EXIF = cv2.IMREAD_IGNORE_ORIENTATION
# Start-of-frame markers (baseline, progressive, lossless, arithmetic ...); not DHT/JPG/DAC.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclass(frozen=True)
class Job:
    path: str  # absolute path of the source image
    landmarks: tuple[float, ...]  # x1 y1 ... x5 y5 in source pixels
    image_size: tuple[int, int]  # (H, W) of the output
    quality: int
    reduce: bool = True  # decode at reduced scale when the face is large enough


@dataclass(frozen=True)
class Outcome:
    jpeg: bytes | None
    reason: str | None = None
    detail: str | None = None
    reduction: int = 1


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header without decoding; None when there is none."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return None
        if marker in _SOF_MARKERS:
            if pos + 9 > end:
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return (width, height) if width > 0 and height > 0 else None
        if marker in (0xD9, 0xDA):  # end of image / scan before any frame header
            return None
        pos += 2 + length
    return None


def jpeg_complete(data: bytes) -> bool:
    """True when the data ends with the end-of-image marker (trailing padding allowed).

    libjpeg fills a truncated file with grey and only warns, so truncation must be caught here.
    """
    tail = data[-512:].rstrip(b"\x00\r\n ")
    return tail.endswith(b"\xff\xd9")


def run(job: Job) -> Outcome:
    try:
        with open(job.path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Outcome(None, "image_missing", "no such file")
    except OSError as err:
        return Outcome(None, "image_unreadable", err.strerror or type(err).__name__)
    if not data:
        return Outcome(None, "image_unreadable", "empty file")
    pts = np.asarray(job.landmarks, dtype=np.float64).reshape(5, 2)
    size = jpeg_size(data)
    is_jpeg = data[:2] == b"\xff\xd8"
    if is_jpeg and size is None:
        return Outcome(None, "jpeg_corrupt", "no readable frame header")
    if is_jpeg and not jpeg_complete(data):
        return Outcome(None, "jpeg_truncated", "no end-of-image marker")
    if size is not None and not _inside(pts, size):
        return Outcome(None, "landmarks_outside_image", f"points outside the {size[0]}x{size[1]} image")
    bad = align.check_geometry(pts, job.image_size)
    if bad is not None:
        return Outcome(None, *bad)
    reduction = 1
    if size is not None:
        matrix = align.similarity_transform(pts, align.template(job.image_size))
        if job.reduce:
            reduction = align.reduction_for(align.transform_scale(matrix))
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(buf, _REDUCED_FLAG[reduction] | _NO_EXIF)
    except cv2.error as err:
        return Outcome(None, "jpeg_corrupt" if is_jpeg else "image_unreadable", str(err).strip()[:200])
    if image is None or image.size == 0:
        return Outcome(None, "jpeg_corrupt" if is_jpeg else "image_unreadable", "the decoder refused it")
    decoded = (image.shape[1], image.shape[0])
    if size is None:  # not a JPEG (PNG etc.): the decoded image is the full one
        size = decoded
        if not _inside(pts, size):
            return Outcome(None, "landmarks_outside_image", f"points outside the {size[0]}x{size[1]} image")
    if decoded != size:
        expected = (math.ceil(size[0] / reduction), math.ceil(size[1] / reduction))
        if decoded != expected:
            return Outcome(None, "jpeg_corrupt", f"decoded {decoded}, header says {size}")
        pts = align.scale_points(pts, size, decoded)
    crop = align.warp(image, pts, job.image_size)
    ok, encoded = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, int(job.quality)])
    if not ok:  # cannot happen for a uint8 BGR array; kept as a reject rather than a crash
        return Outcome(None, "encode_failed", "cv2.imencode refused the crop")
    return Outcome(encoded.tobytes(), reduction=reduction)


def _inside(pts: np.ndarray, size: tuple[int, int]) -> bool:
    width, height = size
    return bool(
        np.all(pts[:, 0] >= 0)
        and np.all(pts[:, 0] <= width)
        and np.all(pts[:, 1] >= 0)
        and np.all(pts[:, 1] <= height)
    )


def run_batch(jobs: list[Job]) -> list[Outcome]:
    """One pool task: a run of jobs, so inter-process traffic is per batch, not per image."""
    return [run(job) for job in jobs]


def init_worker() -> None:
    # One OpenCV thread per worker: the parallelism is across processes.
    cv2.setNumThreads(1)


def init_pool_worker() -> None:
    # Ctrl-C is the parent's to handle (it terminates the pool and drops the half-written shard).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker()
