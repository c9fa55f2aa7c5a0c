"""InsightFace's training sets as they ship (MS1MV2, MS1MV3, Glint360K, WebFace): MXNet RecordIO,
read without mxnet.

A dataset folder holds `train.rec`, `train.idx` and `property`. The layout read here:

- `property`: one line `num_classes,height,width` (e.g. `85742,112,112`).
- `train.idx`: text, one line per record, `index<TAB>byte offset` into `train.rec`.
- `train.rec`: records, each `magic` (uint32 little-endian 0xCED7230A), a length word (uint32:
  the low 29 bits are the payload length, the top 3 bits a continuation flag: 0 for a whole
  record; 1, 2, 3 for the first, middle and last part of a payload that MXNet split where it
  contained the magic word), the payload, and zero padding to a multiple of 4 bytes.
- A payload starts with the IRHeader, `struct "<IfQQ"` (24 bytes): `flag`, `label` (float32),
  `id`, `id2` (uint64). When `flag` > 0, `flag` float32 labels follow and `label` is unused.
  The rest of the payload is the image file (a JPEG, already aligned to 112x112).
- Record 0 is the header record of InsightFace's sets: `flag` = 2 and labels (a, b): image
  records are indices 1 .. a-1; indices a .. b-1 are one record per identity, whose labels give
  that identity's image index range [start, end). Without such a record (flag 0), every index in
  `train.idx` is an image. An image record's class is its label (the first of its labels).

The reader reads the 8 + 24 (+ 4 x flag) header bytes of every image record, never the images;
the build's workers read each image's bytes by offset. Every number read from the files is checked
against them before use: an index offset outside the .rec, a length that runs past its end, a label
count larger than the record, a label that is not a class of `property`. A record that fails is a
reject naming the file, the record and what was wrong. A split record (flags 1, 2 .., 3: MXNet
splits a payload where it holds the magic word at an aligned offset, about one image in a million)
is put back together as dmlc's reader does: the parts' data, with the magic word between them.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import NamedTuple

from common.cli import UserError
from common.fileio import TEXT_ENCODING
from preprocess.datasets import DatasetInputs, Entry

MAGIC = 0xCED7230A
_LENGTH_BITS = (1 << 29) - 1
_WORDS = struct.Struct("<II")  # magic, length word
_IRHEADER = struct.Struct("<IfQQ")  # flag, label, id, id2


def read_property(path: Path) -> tuple[int, int, int]:
    """(num_classes, height, width) from `property`."""
    try:
        text = path.read_text(encoding=TEXT_ENCODING).strip()
        classes, height, width = (int(v) for v in text.split(","))
        if min(classes, height, width) < 1:
            raise ValueError
    except FileNotFoundError:
        raise UserError(f"{path}: no `property` file (expected 'num_classes,height,width')") from None
    except (OSError, UnicodeDecodeError, ValueError):
        raise UserError(f"{path}: not an InsightFace property file ('num_classes,height,width')") from None
    return classes, height, width


def read_idx(path: Path) -> dict[int, int]:
    """index -> byte offset, from `train.idx`."""
    offsets: dict[int, int] = {}
    try:
        with open(path, encoding=TEXT_ENCODING) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: no index file (RecordIO needs the .idx beside the .rec)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable index file ({err})") from None
    for number, line in enumerate(lines, 1):
        try:
            index, offset = (int(v) for v in line.split())
        except ValueError:
            if not line.strip():
                continue
            raise UserError(f"{path}:{number}: expected 'index<TAB>offset'") from None
        if offsets.setdefault(index, offset) != offset:
            raise UserError(f"{path}:{number}: record {index} is listed twice, at different offsets")
    if not offsets:
        raise UserError(f"{path}: the index file is empty")
    return offsets


# Where a record's bytes are: (offset, length) ranges of the .rec whose concatenation is the data.
Ranges = tuple[tuple[int, int], ...]


def read_ranges(f, ranges: Ranges, limit: int | None = None) -> bytes:
    """The bytes of `ranges` joined (the first `limit` of them, when given); short if the file is."""
    chunks = []
    for offset, length in ranges:
        if limit is not None:
            length = min(length, limit - sum(map(len, chunks)))
        f.seek(offset)
        chunks.append(f.read(length))
    return b"".join(chunks)


def skip(ranges: Ranges, count: int) -> Ranges:
    """`ranges` without their first `count` bytes."""
    out = []
    for offset, length in ranges:
        cut = min(count, length)
        count -= cut
        if length > cut:
            out.append((offset + cut, length - cut))
    return tuple(out)


def _record_ranges(f, offset: int, size: int, words: bytes) -> Ranges:
    """The payload of the record at `offset` (whose first 8 bytes are `words`): one range for a
    whole record; for a split one, each part's data with the magic word between them (it stands in
    the file, first in the next part's header, so it is a range too)."""
    ranges: list[tuple[int, int]] = []
    at = offset
    while True:
        if len(words) < _WORDS.size:
            raise ValueError("record_truncated", f"the file ends inside the record header at offset {at}")
        magic, lrec = _WORDS.unpack_from(words)
        if magic != MAGIC:
            raise ValueError("record_corrupt", f"no RecordIO magic at offset {at}")
        length, cflag = lrec & _LENGTH_BITS, lrec >> 29
        if cflag not in ((0, 1) if at == offset else (2, 3)):
            where = "a record" if at == offset else "the next part of the split record"
            raise ValueError("record_corrupt", f"part flag {cflag} at offset {at}, where {where} starts")
        if at + _WORDS.size + length > size:
            raise ValueError(
                "record_truncated",
                f"the {length}-byte record at offset {at} runs past the end of the file ({size} bytes)",
            )
        if ranges:
            ranges.append((at, 4))
        ranges.append((at + _WORDS.size, length))
        if cflag in (0, 3):
            return tuple(ranges)
        at += _WORDS.size + -(-length // 4) * 4  # parts are padded to 4 bytes
        f.seek(at)
        words = f.read(_WORDS.size)


def read_header(f, offset: int, size: int) -> tuple[tuple[float, ...], Ranges]:
    """(labels, byte ranges of the rest: the image) of the record at `offset`; ValueError(reason,
    detail) says what is wrong."""
    if not 0 <= offset <= size - _WORDS.size:
        raise ValueError("record_corrupt", f"offset {offset} is outside the file ({size} bytes)")
    f.seek(offset)
    head = f.read(_WORDS.size + _IRHEADER.size)
    ranges = _record_ranges(f, offset, size, head[: _WORDS.size])
    length = sum(n for _, n in ranges)
    if length < _IRHEADER.size:
        raise ValueError(
            "record_corrupt", f"the {length}-byte record at offset {offset} is shorter than its header"
        )
    header = head[_WORDS.size :] if len(ranges) == 1 else read_ranges(f, ranges, _IRHEADER.size)
    flag, label, _, _ = _IRHEADER.unpack(header)
    labels: tuple[float, ...] = (label,)
    if flag > 0:
        if _IRHEADER.size + 4 * flag > length:
            raise ValueError("record_corrupt", f"{flag} labels in a {length}-byte record at offset {offset}")
        labels = struct.unpack(f"<{flag}f", read_ranges(f, skip(ranges, _IRHEADER.size), 4 * flag))
    return labels, skip(ranges, _IRHEADER.size + 4 * flag)


def read_rec(root: Path, rec: Path | None = None) -> DatasetInputs:
    """One entry per image record of ROOT/train.rec (or `rec`, with its .idx and ROOT/property)."""
    root = Path(root)
    rec = rec or root / "train.rec"
    if not rec.is_file():
        raise UserError(f"{rec}: no RecordIO file (point at it with --rec)")
    offsets = read_idx(rec.with_suffix(".idx"))
    num_classes, height, width = read_property(root / "property")
    size = rec.stat().st_size
    images = sorted(offsets)
    with open(rec, "rb") as f:
        if 0 in offsets:
            try:
                labels, _ = read_header(f, offsets[0], size)
            except ValueError as err:
                raise UserError(f"{rec}: record 0 unreadable ({err.args[1]})") from None
            if len(labels) >= 2:  # InsightFace's header record: images are 1 .. a-1
                end = labels[0]
                if not (math.isfinite(end) and end == int(end) and end >= 1):
                    raise UserError(
                        f"{rec}: record 0 says the images end at record {end}, not a record number"
                    )
                images = [i for i in images if 1 <= i < int(end)]
        classes = Classes(num_classes, len(str(num_classes - 1)))
        entries = [_entry(f, rec, index, offsets[index], size, classes) for index in images]
    return DatasetInputs(
        "rec",
        "train",
        rec.parent,
        entries,
        files={
            "rec": str(rec),
            "idx": str(rec.with_suffix(".idx")),
            "property": f"{root / 'property'} ({num_classes} classes, {height}x{width})",
        },
    )


class Classes(NamedTuple):
    count: int  # from `property`: labels are 0 .. count - 1
    digits: int  # identity names are the label zero-padded to this, so that they sort in label order


def _entry(f, rec: Path, index: int, offset: int, size: int, classes: Classes) -> Entry:
    """The image record `index`; its identity is its class number."""
    unreadable = f"unreadable/{index:09d}"
    try:
        labels, image = read_header(f, offset, size)
    except ValueError as err:
        return Entry(unreadable, "", reason=err.args[0], detail=f"{rec} record {index}: {err.args[1]}")
    if not image:
        return Entry(unreadable, "", reason="record_corrupt", detail=f"{rec} record {index}: holds no image")
    label = labels[0]
    if not (math.isfinite(label) and label == int(label) and 0 <= label < classes.count):
        detail = (
            f"{rec} record {index}: label {label} (offset {offset}) is not a class number "
            f"0..{classes.count - 1} of `property`"
        )
        return Entry(unreadable, "", reason="record_corrupt", detail=detail)
    name = str(int(label)).zfill(classes.digits)
    return Entry(f"{name}/{index:09d}", name, source=str(rec), span=image)
