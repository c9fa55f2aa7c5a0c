"""The per-image job run in the worker processes: read, check, decode (reduced when safe), align,
encode, and pack the sample's tar members. A pool task is a part of a shard (`run_part`): its
samples go to a part file the worker writes itself, and only their member offsets and the rejects
travel back, so the parent appends whole parts to the shard and touches no image bytes per sample.

Modes: `landmarks` (align with the job's 5 points), `detect` (find the face and its 5 points with
preprocess/detect.py first), `aligned` (the input is already an aligned crop: a JPEG of the output
size passes through unchanged, anything else is rescaled onto the output template). Everything that
can go wrong with one input becomes a (reason, detail) pair, never an exception, so a bad file cannot
stop a build.
"""

from __future__ import annotations

import math
import os
import signal
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from preprocess import align
from preprocess.face_choice import LARGEST_CENTRAL, SINGLE_FACE_ONLY, choose_face
from preprocess.recordio import read_ranges
from shards.format import MIN_IMAGE_SIDE, sample_key
from shards.writer import Members, encode_sample

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
    path: str  # absolute path of the source image (or of the RecordIO file holding it)
    landmarks: tuple[float, ...]  # x1 y1 ... x5 y5 in source pixels (mode "landmarks")
    image_size: tuple[int, int]  # (H, W) of the output
    quality: int
    reduce: bool = True  # decode at reduced scale when the face is large enough
    mode: str = "landmarks"  # "landmarks" | "detect" | "aligned"
    span: tuple[tuple[int, int], ...] | None = None  # (offset, length) ranges of the image in `path`
    single_face_only: bool = False  # mode "detect": several faces -> reject instead of choosing


@dataclass(frozen=True)
class Outcome:
    jpeg: bytes | None
    reason: str | None = None
    detail: str | None = None
    reduction: int = 1
    found: dict[str, Any] | None = None  # mode "detect": what goes into the record (points, score, box)


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


def _read(job: Job) -> bytes | Outcome:
    """The image's bytes; only a regular file is read (opening a FIFO or a device could block)."""
    try:
        fd = os.open(job.path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return Outcome(None, "image_missing", "no such file")
    except OSError as err:
        return Outcome(None, "image_unreadable", err.strerror or type(err).__name__)
    try:
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return Outcome(None, "not_a_file", "not a regular file (a FIFO, socket or device)")
            if job.span is None:
                return f.read() or Outcome(None, "image_unreadable", "empty file")
            data = read_ranges(f, job.span)
    except OSError as err:
        return Outcome(None, "image_unreadable", err.strerror or type(err).__name__)
    length = sum(n for _, n in job.span)
    if len(data) != length:
        return Outcome(None, "record_truncated", f"{len(data)} of {length} bytes at offset {job.span[0][0]}")
    return data


def _decode(data: bytes, flag: int, is_jpeg: bool) -> np.ndarray | Outcome:
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag | _NO_EXIF)
    except cv2.error as err:
        return Outcome(None, "jpeg_corrupt" if is_jpeg else "image_unreadable", str(err).strip()[:200])
    if image is None or image.size == 0:
        return Outcome(None, "jpeg_corrupt" if is_jpeg else "image_unreadable", "the decoder refused it")
    if flag == cv2.IMREAD_COLOR:  # full size (a JPEG's size was checked from its header already)
        return _too_small((image.shape[1], image.shape[0])) or image
    return image


def _too_small(size: tuple[int, int]) -> Outcome | None:
    """The reject of an image too small to hold a face: a side under MIN_IMAGE_SIDE (the smallest
    output side), e.g. a 1x1 tracking pixel that would otherwise be stretched into a "face"."""
    if min(size) < MIN_IMAGE_SIDE:
        return Outcome(None, "image_too_small", f"{size[0]}x{size[1]} pixels, a face needs {MIN_IMAGE_SIDE}")
    return None


def _check_jpeg(data: bytes) -> tuple[int, int] | None | Outcome:
    """The JPEG's (width, height), None for another format, or the reject of a broken JPEG."""
    size = jpeg_size(data)
    if data[:2] == b"\xff\xd8":
        if size is None:
            return Outcome(None, "jpeg_corrupt", "no readable frame header")
        if not jpeg_complete(data):
            return Outcome(None, "jpeg_truncated", "no end-of-image marker")
    return size


def run(job: Job) -> Outcome:
    data = _read(job)
    if isinstance(data, Outcome):
        return data
    size = _check_jpeg(data)
    if isinstance(size, Outcome):
        return size
    small = _too_small(size) if size is not None else None
    if small:
        return small
    if job.mode == "aligned":
        return _run_aligned(job, data, size)
    if job.mode == "detect":
        return _run_detect(job, data)
    pts = np.asarray(job.landmarks, dtype=np.float64).reshape(5, 2)
    bad = align.check_landmarks(pts, job.image_size, size)  # size None: not a JPEG, checked once decoded
    if bad is not None:
        return Outcome(None, *bad)
    reduction = 1
    matrix = align.similarity_transform(pts, align.template(job.image_size))
    if size is not None and job.reduce:
        reduction = align.reduction_for(align.transform_scale(matrix))
    image = _decode(data, _REDUCED_FLAG[reduction], size is not None)
    if isinstance(image, Outcome):
        return image
    decoded = (image.shape[1], image.shape[0])
    if size is None:  # not a JPEG (PNG etc.): the decoded image is the full one
        size = decoded
        bad = align.check_landmarks(pts, job.image_size, size)
        if bad is not None:
            return Outcome(None, *bad)
    if decoded != size:
        expected = (math.ceil(size[0] / reduction), math.ceil(size[1] / reduction))
        if decoded != expected:
            return Outcome(None, "jpeg_corrupt", f"decoded {decoded}, header says {size}")
        pts = align.scale_points(pts, size, decoded)
        matrix = align.similarity_transform(pts, align.template(job.image_size))
    return _encode(align.warp(image, pts, job.image_size, matrix), job, reduction=reduction)


def _encode(crop: np.ndarray, job: Job, **fields: Any) -> Outcome:
    ok, encoded = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, int(job.quality)])
    if not ok:  # cannot happen for a uint8 BGR array; kept as a reject rather than a crash
        return Outcome(None, "encode_failed", "cv2.imencode refused the crop")
    return Outcome(encoded.tobytes(), **fields)


def _run_aligned(job: Job, data: bytes, size: tuple[int, int] | None) -> Outcome:
    """An aligned crop: unchanged when it is a JPEG of the output size, else rescaled template to template."""
    height, width = job.image_size
    if size == (width, height):
        return Outcome(data)
    image = _decode(data, cv2.IMREAD_COLOR, size is not None)
    if isinstance(image, Outcome):
        return image
    src = align.template((image.shape[0], image.shape[1]))
    matrix = align.similarity_transform(src, align.template(job.image_size))
    return _encode(align.warp(image, src, job.image_size, matrix), job)


def _run_detect(job: Job, data: bytes) -> Outcome:
    image = _decode(data, cv2.IMREAD_COLOR, data[:2] == b"\xff\xd8")
    if isinstance(image, Outcome):
        return image
    faces = detector()(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    face, reject = choose_face(
        faces, image.shape, SINGLE_FACE_ONLY if job.single_face_only else LARGEST_CENTRAL
    )
    if face is None:
        found = f"{len(faces)} faces" if faces else "no face"
        return Outcome(None, reject, f"the detector found {found}")
    pts = np.asarray(face.landmarks, dtype=np.float64).reshape(5, 2)
    bad = align.check_landmarks(pts, job.image_size, (image.shape[1], image.shape[0]))
    if bad is not None:
        return Outcome(None, *bad)
    found = {
        "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in pts],
        "detector_score": round(float(face.score), 4),
        "detector_box": [round(float(v), 2) for v in face.box],  # x, y, w, h
        "faces_found": len(faces),
    }
    return _encode(align.warp(image, pts, job.image_size), job, found=found)


def detector():
    """detect_faces of preprocess/detect.py, imported on first use (only --detect needs it):
    RGB image -> faces with `.box` (x, y, w, h), `.score`, `.landmarks` (5 points in the template's
    order), best score first."""
    from preprocess import detect  # a dictionary lookup after the first call

    return detect.detect_faces


@dataclass(frozen=True)
class Settings:
    """What every job of a build shares: sent once per task, not once per image."""

    image_root: str
    image_size: tuple[int, int]
    quality: int
    reduce: bool = True
    mode: str = "landmarks"
    single_face_only: bool = False


# One input as the parent sends it, plain values (cheap to make and to pickle): relative path,
# identity, label, landmarks, VGGFace2 box, person's name, source file (when not under the image
# root: RecordIO) and the (offset, length) ranges of its bytes there.
Row = tuple[
    str,
    str,
    int,
    "tuple[float, ...] | None",
    "tuple[float, ...] | None",
    "str | None",
    "str | None",
    "tuple[tuple[int, int], ...] | None",
]


@dataclass
class PartResult:
    samples: list[tuple[int, Members]]  # (row number, its tar members at offsets in the part file)
    rejects: list[tuple[int, str, str]]  # (row number, reason, detail)
    reductions: Counter = field(default_factory=Counter)  # decode reduction -> samples
    cpu: float = 0.0  # CPU seconds the task took (the build reports its CPU cost per image)


def _job(settings: Settings, row: Row) -> Job:
    rel, _, _, landmarks, _, _, source, span = row
    return Job(
        source or f"{settings.image_root}{os.sep}{rel}",
        landmarks or (),
        settings.image_size,
        settings.quality,
        settings.reduce,
        mode=settings.mode,
        span=span,
        single_face_only=settings.single_face_only,
    )


def _record(row: Row, found: dict[str, Any] | None) -> dict[str, Any]:
    """The sample's JSON record: where it came from, and what the detector found."""
    rel, identity, label, landmarks, bbox, name, _, _ = row
    record: dict[str, Any] = {"identity": identity, "label": label, "source": rel}
    if landmarks:
        record["landmarks"] = [list(p) for p in zip(landmarks[0::2], landmarks[1::2])]
    if name is not None:
        record["name"] = name
    if bbox is not None:
        record["bbox"] = list(bbox)
    return record if found is None else {**record, **found}


def run_part(task: tuple[Settings, list[Row], str]) -> PartResult:
    """One pool task: align the rows and write their packed samples, in row order, to the part file
    (one write); return where each sample's members lie in it, and the rejects."""
    started = time.process_time()
    settings, rows, path = task
    result = PartResult([], [])
    chunks, offset = [], 0
    for i, row in enumerate(rows):
        outcome = run(_job(settings, row))
        if outcome.jpeg is None:
            result.rejects.append((i, outcome.reason or "", outcome.detail or ""))
            continue
        data, members = encode_sample(sample_key(row[0]), outcome.jpeg, row[2], _record(row, outcome.found))
        result.samples.append((i, tuple((ext, offset + at, size, name) for ext, at, size, name in members)))
        result.reductions[outcome.reduction] += 1
        chunks.append(data)
        offset += len(data)
    with open(path, "wb") as f:  # no fsync: the shard it goes into is synced when complete
        f.write(b"".join(chunks))
    result.cpu = time.process_time() - started
    return result


def init_worker() -> None:
    # One OpenCV thread per worker: the parallelism is across processes.
    cv2.setNumThreads(1)


def init_pool_worker() -> None:
    # Ctrl-C is the parent's to handle (it terminates the pool and drops the half-written shard).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker()
