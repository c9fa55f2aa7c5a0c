"""Damage a shard set the way disks, copies and hostile users do, for the reliability tests.

Every function changes bytes in place and keeps each file's size (so the manifest's default size
check passes and only the per-sample checks can see it), except `set_manifest_path`.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from shards.format import TAR_BLOCK, encode_label
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
