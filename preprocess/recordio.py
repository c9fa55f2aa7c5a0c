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
the build's workers read each image's bytes by offset. A record whose header does not parse is a
reject naming its offset; a split (multi-part) image record, which InsightFace's sets do not hold,
is a reject too.
"""

from __future__ import annotations

import struct
from pathlib import Path

from common.cli import UserError
from preprocess.datasets import DatasetInputs, Entry

MAGIC = 0xCED7230A
_LENGTH_BITS = (1 << 29) - 1
_WORDS = struct.Struct("<II")  # magic, length word
_IRHEADER = struct.Struct("<IfQQ")  # flag, label, id, id2


def read_property(path: Path) -> tuple[int, int, int]:
    """(num_classes, height, width) from `property`."""
    try:
        text = path.read_text(encoding="utf-8").strip()
        classes, height, width = (int(v) for v in text.split(","))
    except FileNotFoundError:
        raise UserError(f"{path}: no `property` file (expected 'num_classes,height,width')") from None
    except (OSError, UnicodeDecodeError, ValueError):
        raise UserError(f"{path}: not an InsightFace property file ('num_classes,height,width')") from None
    return classes, height, width


def read_idx(path: Path) -> dict[int, int]:
    """index -> byte offset, from `train.idx`."""
    offsets: dict[int, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
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
        offsets[index] = offset
    if not offsets:
        raise UserError(f"{path}: the index file is empty")
    return offsets


def read_header(f, offset: int, size: int) -> tuple[tuple[float, ...], int, int]:
    """(labels, image offset, image length) of the record at `offset`; ValueError says what is wrong."""
    f.seek(offset)
    words = f.read(_WORDS.size + _IRHEADER.size)
    if len(words) < _WORDS.size + _IRHEADER.size:
        raise ValueError("record_truncated", "the file ends inside the record header")
    magic, lrec = _WORDS.unpack_from(words)
    if magic != MAGIC:
        raise ValueError("record_corrupt", f"no RecordIO magic at offset {offset}")
    length, cflag = lrec & _LENGTH_BITS, lrec >> 29
    if cflag != 0:
        raise ValueError("record_multipart", f"a split record (flag {cflag}) at offset {offset}")
    flag, label, _, _ = _IRHEADER.unpack_from(words, _WORDS.size)
    start = offset + _WORDS.size + _IRHEADER.size
    labels: tuple[float, ...] = (label,)
    if flag > 0:
        if _IRHEADER.size + 4 * flag > length:
            raise ValueError("record_corrupt", f"{flag} labels in a {length}-byte record at offset {offset}")
        labels = struct.unpack(f"<{flag}f", f.read(4 * flag))
        start += 4 * flag
    end = offset + _WORDS.size + length
    if end > size:
        raise ValueError("record_truncated", f"record at offset {offset} runs past the end of the file")
    return labels, start, end - start


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
                labels, _, _ = read_header(f, offsets[0], size)
            except ValueError as err:
                raise UserError(f"{rec}: record 0 unreadable ({err.args[1]})") from None
            if len(labels) >= 2:  # InsightFace's header record: images are 1 .. a-1
                images = [i for i in images if 1 <= i < int(labels[0])]
        digits = len(str(max(num_classes - 1, 0)))
        entries = [_entry(f, rec, index, offsets[index], size, digits) for index in images]
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


def _entry(f, rec: Path, index: int, offset: int, size: int, digits: int) -> Entry:
    """The image record `index`; its identity is its class number, zero-padded to `digits` so that
    sorted identity names keep the RecordIO's label order."""
    try:
        labels, start, length = read_header(f, offset, size)
    except ValueError as err:
        return Entry(f"unreadable/{index:09d}", "", reason=err.args[0], detail=err.args[1])
    label = labels[0]
    if not (label >= 0 and label == int(label)):
        detail = f"label {label} of the record at offset {offset} is not a class number"
        return Entry(f"unreadable/{index:09d}", "", reason="record_corrupt", detail=detail)
    name = str(int(label)).zfill(digits)
    return Entry(f"{name}/{index:09d}", name, source=str(rec), span=(start, length))
