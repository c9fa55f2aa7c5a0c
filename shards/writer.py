"""Writes one shard: a deterministic WebDataset tar plus its DALI index, renamed into place when done.

Determinism: member metadata is fixed (mtime 0, root owner, mode 0644, GNU format), so the same
samples in the same order give byte-identical files. Safety: both files are written with
`shards.fileio.atomic_write` (a `.tmp` name, fsync, rename); a shard whose final `.tar` exists is
complete (its `.idx` is renamed first). Integrity: each sample's `.json` record gets a `crc32`
field with the CRC32 of its `.jpg` and `.lbl` members, which the readers check on every read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
import zlib
from pathlib import Path
from typing import IO

from shards.fileio import atomic_write, atomic_write_text
from shards.format import CRC_FIELD, INDEX_VERSION, TAR_BLOCK, encode_label, index_name
from shards.manifest import ShardInfo


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


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
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)  # type: ignore[call-overload]
        self._index_lines: list[str] = []
        self.samples = 0

    def add(self, key: str, jpeg: bytes, label: int, record: dict) -> None:
        label_bytes = encode_label(label)
        record = {**record, CRC_FIELD: sample_crcs(jpeg, label_bytes)}
        record_bytes = json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")
        entries = []
        for ext, data in (("jpg", jpeg), ("lbl", label_bytes), ("json", record_bytes)):
            info, payload = _member(f"{key}.{ext}", data)
            self._tar.addfile(info, payload)
            # The data ends the member, padded to whole blocks; headers (long names add blocks) precede it.
            padded = -(-len(data) // TAR_BLOCK) * TAR_BLOCK
            entries.append(f"{ext} {self._tar.offset - padded} {len(data)} {info.name}")
        self._index_lines.append(" ".join(entries))
        self.samples += 1

    def close(self) -> ShardInfo:
        self._tar.close()  # writes the end-of-archive blocks through the hashing file
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
