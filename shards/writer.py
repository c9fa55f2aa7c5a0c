"""Writes one shard: a deterministic WebDataset tar plus its DALI index, renamed into place when done.

Determinism: member metadata is fixed (mtime 0, root owner, mode 0644, GNU format), so the same
samples in the same order give byte-identical files. Safety: both files are written with
`common.fileio.atomic_write` (a `.tmp` name, fsync, rename); a shard whose final `.tar` exists is
complete (its `.idx` is renamed first). Integrity: each sample's `.json` record gets a `crc32`
field with the CRC32 of its `.jpg` and `.lbl` members, which the readers check on every read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
import zlib
from pathlib import Path
from typing import IO

from common.fileio import atomic_write, atomic_write_text
from shards.format import CRC_FIELD, INDEX_VERSION, TAR_BLOCK, encode_label, index_name
from shards.manifest import ShardInfo

_RECORD = tarfile.RECORDSIZE  # tar files end padded to a whole record (20 blocks)
# Every member has the same metadata, so a header is: name, these fixed fields, size, and a checksum.
_MODE_IDS = b"0000644\0" + b"0000000\0" * 2  # mode 0644, uid 0, gid 0
_MTIME = b"%011o\0" % 0
_AFTER_CHKSUM = (b"0" + b"\0" * 100 + tarfile.GNU_MAGIC + b"\0" * 32 * 2 + b"\0" * 16 + b"\0" * 155).ljust(
    TAR_BLOCK - 156, b"\0"
)  # type, link name, magic, uname, gname, device numbers, prefix, pad
_CHKSUM_REST = sum(_AFTER_CHKSUM) + 8 * ord(" ")  # the checksum counts its own field as spaces


def _header(name: str, size: int) -> bytes:
    """The GNU tar header of a member with the fixed metadata, byte for byte what `tarfile` writes.

    Written by hand because `tarfile`'s general path costs more per sample than the rest of the
    parent's work; long names (GNU long-name blocks) and huge sizes still go through `tarfile`.
    """
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
        info.uname = info.gname = ""
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    head = raw.ljust(100, b"\0") + _MODE_IDS + b"%011o\0" % size + _MTIME
    return head + b"%06o\0 " % (sum(head) + _CHKSUM_REST) + _AFTER_CHKSUM


Members = tuple[tuple[str, int, int, str], ...]  # (extension, data offset, data size, member name)


def encode_sample(key: str, jpeg: bytes, label: int, record: dict) -> tuple[bytes, Members]:
    """One sample's three tar members (headers, data, padding) as bytes, and for the DALI index each
    member's (extension, data offset from the start of these bytes, data size, member name).

    The record gets its `crc32` field here. Pure and cheap, so the build's worker processes run it
    and the parent only appends bytes.
    """
    label_bytes = encode_label(label)
    record = {**record, CRC_FIELD: sample_crcs(jpeg, label_bytes)}
    record_bytes = json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")
    parts: list[bytes] = []
    members = []
    offset = 0
    for ext, data in (("jpg", jpeg), ("lbl", label_bytes), ("json", record_bytes)):
        name = f"{key}.{ext}"
        header = _header(name, len(data))
        offset += len(header)
        members.append((ext, offset, len(data), name))
        padding = -len(data) % TAR_BLOCK
        parts += (header, data, b"\0" * padding)
        offset += len(data) + padding
    return b"".join(parts), tuple(members)


def index_path_for(tar_path: Path) -> Path:
    return tar_path.with_name(index_name(tar_path.name))


def sample_crcs(jpeg: bytes, label_bytes: bytes) -> dict[str, int]:
    """The `crc32` field of a sample record (the readers recompute it the same way)."""
    return {"jpg": zlib.crc32(jpeg), "lbl": zlib.crc32(label_bytes)}


class _HashingFile:
    """A write-only file that hashes and counts what passes through, so no one re-reads the tar."""

    def __init__(self, file: IO[bytes]):
        self._file = file
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self.bytes


class _Aborted(Exception):
    """Handed to the atomic write on abort, so it drops the temporary file."""


class ShardWriter:
    """Collects samples into `<path>.tmp`; `close()` writes the index and renames both into place.

    The DALI index (`ext offset size name` per member, one line per sample, format v1.2 of DALI's
    wds2idx) and the SHA-256 are computed while writing: the tar is never read back.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._stack = contextlib.ExitStack()
        self._file = _HashingFile(self._stack.enter_context(atomic_write(self.path, "wb", what="shard")))
        self._index_lines: list[str] = []
        self.samples = 0

    def add(self, key: str, jpeg: bytes, label: int, record: dict) -> None:
        data, members = encode_sample(key, jpeg, label, record)
        self.add_part(data, [members])

    def add_part(self, data: bytes, samples: list[Members]) -> None:
        """Append consecutive samples made by `encode_sample` (possibly in another process): their
        bytes, and each one's members at offsets inside `data`."""
        base = self._file.bytes
        self._file.write(data)
        for members in samples:
            line = " ".join(f"{ext} {base + off} {size} {name}" for ext, off, size, name in members)
            self._index_lines.append(line)
        self.samples += len(samples)

    def close(self) -> ShardInfo:
        end = self._file.bytes + 2 * TAR_BLOCK  # two zero blocks end the archive, then pad the record
        self._file.write(b"\0" * (2 * TAR_BLOCK + -end % _RECORD))
        index = index_path_for(self.path)
        lines = "".join(line + "\n" for line in self._index_lines)
        try:
            atomic_write_text(index, f"{INDEX_VERSION} {self.samples}\n{lines}", what="DALI index")
        except BaseException:
            self.abort()
            raise
        self._stack.close()  # fsync and rename the tar, after its index
        return ShardInfo(
            file=self.path.name,
            index=index.name,
            samples=self.samples,
            bytes=self._file.bytes,
            sha256=self._file.digest.hexdigest(),
        )

    def abort(self) -> None:
        """Drop a half-written shard (used on errors and interrupts): no end blocks, no fsync."""
        self._stack.__exit__(_Aborted, _Aborted(), None)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
