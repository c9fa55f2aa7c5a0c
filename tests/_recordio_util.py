"""InsightFace RecordIO packs for the tests, written as MXNet/dmlc writes them (preprocess/recordio.py
documents the layout), split records included."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

from preprocess._marker_faces import face_image, random_landmarks
from preprocess.recordio import MAGIC

_MAGIC_BYTES = struct.pack("<I", MAGIC)


def record(payload: bytes) -> bytes:
    """One record as dmlc's RecordIOWriter writes it: where the payload holds the magic word at an
    aligned offset, the payload is cut there into parts (flags 1, 2 .., 3) and the magic word left
    out; each part is `magic, flag << 29 | length, data`, and the last is padded to 4 bytes."""
    parts, start = [], 0
    for at in range(0, len(payload) - len(payload) % 4, 4):
        if payload[at : at + 4] == _MAGIC_BYTES:
            parts.append(payload[start:at])
            start = at + 4
    parts.append(payload[start:])
    out = b""
    for i, data in enumerate(parts):
        flag = 0 if len(parts) == 1 else 1 if i == 0 else 3 if i == len(parts) - 1 else 2
        out += struct.pack("<II", MAGIC, flag << 29 | len(data)) + data
    return out + b"\0" * (-len(out) % 4)


def irheader(label: float | tuple[float, ...], data: bytes = b"") -> bytes:
    if isinstance(label, tuple):
        return struct.pack("<IfQQ", len(label), 0.0, 0, 0) + struct.pack(f"<{len(label)}f", *label) + data
    return struct.pack("<IfQQ", 0, float(label), 0, 0) + data


def jpeg(rng: np.random.Generator, size: int = 112) -> bytes:
    pts = random_landmarks(size, size, rng, (30.0, 40.0))
    ok, data = cv2.imencode(".jpg", face_image(size, size, pts, rng), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return data.tobytes()


def write_rec(
    root: Path,
    per_class: tuple[int, ...] = (13, 11),
    corrupt: int | None = None,
    images: dict[int, tuple[int, bytes]] | None = None,
) -> dict[int, tuple[int, bytes]]:
    """train.rec/.idx/property with InsightFace's header record 0 and identity records; returns
    {record index: (label, jpeg bytes)} of the image records (`images` replaces some of them).
    `corrupt`: that record's magic is broken."""
    rng = np.random.default_rng(0)
    made, index = {}, 1
    for label, count in enumerate(per_class):
        for _ in range(count):
            made[index] = (label, jpeg(rng))
            index += 1
    made.update(images or {})
    first_identity = index
    identities = {}
    start = 1
    for label, count in enumerate(per_class):
        identities[first_identity + label] = (float(start), float(start + count))
        start += count
    records = {0: irheader((float(first_identity), float(first_identity + len(per_class))))}
    records.update({i: irheader(float(label), data) for i, (label, data) in made.items()})
    records.update({i: irheader(rng_range) for i, rng_range in identities.items()})
    blob, idx = b"", []
    for i in sorted(records):
        raw = record(records[i])
        if i == corrupt:
            raw = b"\0\0\0\0" + raw[4:]
        idx.append(f"{i}\t{len(blob)}")
        blob += raw
    (root / "train.rec").write_bytes(blob)
    (root / "train.idx").write_text("\n".join(idx) + "\n")
    (root / "property").write_text(f"{len(per_class)},112,112\n")
    return made
