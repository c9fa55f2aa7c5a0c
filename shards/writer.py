"""Writes one shard: a deterministic WebDataset tar plus its DALI index, renamed into place when done.

Determinism: member metadata is fixed (mtime 0, root owner, mode 0644, GNU format), so the same
samples in the same order give byte-identical files. Safety: everything is written under a `.tmp`
name, flushed to disk, and renamed; a shard whose final `.tar` exists is complete (its `.idx` is
renamed first).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

from shards.format import encode_label
from shards.manifest import ShardInfo

_INDEX_VERSION = "v1.2"  # the index format of DALI's wds2idx


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def index_path_for(tar_path: Path) -> Path:
    return tar_path.with_suffix(".idx")


class _HashingFile:
    """A write-only file that hashes and counts what passes through, so no one re-reads the tar."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self.bytes

    def close(self, sync: bool = True) -> None:
        if sync:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()


class ShardWriter:
    """Collects samples into `<path>.tmp`; `close()` writes the index and renames both into place.

    The DALI index (`ext offset size name` per member, one line per sample, format v1.2 of DALI's
    wds2idx) and the SHA-256 are computed while writing: the tar is never read back.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self._file = _HashingFile(self.tmp_path)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        self._index_lines: list[str] = []
        self.samples = 0

    def add(self, key: str, jpeg: bytes, label: int, record: dict) -> None:
        record_bytes = json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")
        entries = []
        for ext, data in (("jpg", jpeg), ("lbl", encode_label(label)), ("json", record_bytes)):
            info, payload = _member(f"{key}.{ext}", data)
            self._tar.addfile(info, payload)
            # The data ends the member, padded to whole blocks; headers (long names add blocks) precede it.
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            entries.append(f"{ext} {self._tar.offset - padded} {len(data)} {info.name}")
        self._index_lines.append(" ".join(entries))
        self.samples += 1

    def close(self) -> ShardInfo:
        self._tar.close()  # writes the end-of-archive blocks through the hashing file
        self._file.close()
        index = index_path_for(self.path)
        index_tmp = index.with_name(index.name + ".tmp")
        with open(index_tmp, "w", encoding="ascii") as f:
            f.write(f"{_INDEX_VERSION} {self.samples}\n")
            f.writelines(line + "\n" for line in self._index_lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(index_tmp, index)
        os.replace(self.tmp_path, self.path)
        return ShardInfo(
            file=self.path.name,
            index=index.name,
            samples=self.samples,
            bytes=self._file.bytes,
            sha256=self._file.digest.hexdigest(),
        )

    def abort(self) -> None:
        """Drop a half-written shard (used on errors and interrupts): no end blocks, no fsync."""
        self._file.close(sync=False)
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
