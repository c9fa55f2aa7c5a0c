"""Damage a shard set or a RecordIO pack the way disks, copies and hostile users do, for the
reliability tests.

Every function on a shard's tar changes bytes in place and keeps the file's size (so the manifest's
default size check passes and only the per-sample checks can see it). The index functions
(`set_index_field`, `set_rec_offset`) rewrite one line of a text index; `set_manifest_path` one field.
"""

from __future__ import annotations

import json
import struct
import tarfile
from pathlib import Path

from shards.format import INDEX_SUFFIX, TAR_BLOCK, encode_label
from shards.manifest import MANIFEST_NAME


def member_offset(tar_path: Path, name: str) -> int:
    """Byte offset of a member's data in the tar (its header is the block before)."""
    with tarfile.open(tar_path) as tar:
        return tar.getmember(name).offset_data


def _write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def set_label(tar_path: Path, key: str, label: int) -> None:
    """Overwrite the 4-byte `.lbl` member of sample `key` (in or out of the class range)."""
    _write_at(tar_path, member_offset(tar_path, f"{key}.lbl"), encode_label(label))


def flip_jpeg_byte(tar_path: Path, key: str, at: float = 0.6) -> None:
    """Invert one byte of the JPEG data, `at` of the way in (entropy-coded data: it may still decode)."""
    offset = member_offset(tar_path, f"{key}.jpg")
    with tarfile.open(tar_path) as tar:
        size = tar.getmember(f"{key}.jpg").size
    where = offset + int(size * at)
    with open(tar_path, "r+b") as f:
        f.seek(where)
        byte = f.read(1)[0]
    _write_at(tar_path, where, bytes([byte ^ 0xFF]))


def corrupt_tar_header(tar_path: Path, key: str) -> None:
    """Overwrite part of the name field of the `.jpg` member's tar header (its checksum no longer fits)."""
    _write_at(tar_path, member_offset(tar_path, f"{key}.jpg") - TAR_BLOCK + 10, b"\x00" * 64)


def garble_crc_field(tar_path: Path, key: str) -> None:
    """Replace the first digit of the record's `crc32` value with a letter (the record no longer parses)."""
    offset = member_offset(tar_path, f"{key}.json")
    with open(tar_path, "rb") as f:
        f.seek(offset)
        record = f.read(TAR_BLOCK)
    at = record.index(b'"crc32":{"jpg":') + len(b'"crc32":{"jpg":')
    _write_at(tar_path, offset + at, b"x")


def set_manifest_path(root: Path, shard: int, field: str, value: str) -> None:
    """Point `shards[shard].<field>` (`file` or `index`) of the manifest at `value`, e.g. `../x`."""
    path = root / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["shards"][shard][field] = value
    path.write_text(json.dumps(data))


def set_index_field(tar_path: Path, key: str, ext: str, field: str, value: str) -> None:
    """In the `.idx` beside the tar, set the `offset` or `size` of sample `key`'s `ext` member."""
    idx = tar_path.with_suffix(INDEX_SUFFIX)
    lines = idx.read_text().splitlines()
    for n, line in enumerate(lines[1:], 1):
        fields = line.split()
        groups = [fields[j : j + 4] for j in range(0, len(fields), 4)]
        if any(g[0] == "jpg" and g[3] == f"{key}.jpg" for g in groups):
            for g in groups:
                if g[0] == ext:
                    g[{"offset": 1, "size": 2}[field]] = value
            lines[n] = " ".join(f for g in groups for f in g)
            break
    else:
        raise KeyError(key)
    idx.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------- RecordIO


def rec_offset(rec_path: Path, index: int) -> int:
    """The offset `train.idx` gives for record `index`."""
    for line in rec_path.with_suffix(".idx").read_text().splitlines():
        i, offset = line.split()
        if int(i) == index:
            return int(offset)
    raise KeyError(index)


def set_rec_offset(rec_path: Path, index: int, offset: int) -> None:
    """Give record `index` another offset in `train.idx` (negative, past the end, huge ...)."""
    idx = rec_path.with_suffix(".idx")
    lines = [
        f"{index}\t{offset}" if line.split()[0] == str(index) else line
        for line in idx.read_text().splitlines()
    ]
    idx.write_text("\n".join(lines) + "\n")


def set_rec_length(rec_path: Path, index: int, length: int, flag: int = 0) -> None:
    """Overwrite the length word of record `index`: `flag << 29 | length`."""
    _write_at(rec_path, rec_offset(rec_path, index) + 4, struct.pack("<I", flag << 29 | length))


def set_rec_label(rec_path: Path, index: int, label: float, listed: bool = False) -> None:
    """Overwrite the float32 label in record `index`'s IRHeader (inf, NaN, -1, 1.5 ...); `listed`:
    the first of the labels that follow the header instead (a record whose `flag` is > 0)."""
    _write_at(rec_path, rec_offset(rec_path, index) + (8 + 24 if listed else 8 + 4), struct.pack("<f", label))


def set_rec_label_count(rec_path: Path, index: int, count: int) -> None:
    """Overwrite the IRHeader's `flag`, the number of float labels that follow it."""
    _write_at(rec_path, rec_offset(rec_path, index) + 8, struct.pack("<I", count))
