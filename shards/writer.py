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


def write_dali_index(tar_path: Path, out_path: Path) -> int:
    """Write DALI's webdataset index for a tar: one line per sample, `ext offset size name` per member."""
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            dot = member.name.find(".", len(member.name) - len(base))
            key, ext = member.name[:dot], member.name[dot + 1 :]
            entry = f"{ext} {member.offset_data} {member.size} {member.name}"
            if key != last_key:
                samples.append([entry])
                last_key = key
            else:
                samples[-1].append(entry)
    with open(out_path, "w", encoding="ascii") as f:
        f.write(f"{_INDEX_VERSION} {len(samples)}\n")
        for entries in samples:
            f.write(" ".join(entries) + "\n")
    return len(samples)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class ShardWriter:
    """Collects samples into `<path>.tmp`; `close()` indexes it and renames both files into place."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self._tar = tarfile.open(self.tmp_path, "w", format=tarfile.GNU_FORMAT)
        self.samples = 0

    def add(self, key: str, jpeg: bytes, label: int, record: dict) -> None:
        record_bytes = json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")
        for ext, data in (("jpg", jpeg), ("lbl", encode_label(label)), ("json", record_bytes)):
            info, payload = _member(f"{key}.{ext}", data)
            self._tar.addfile(info, payload)
        self.samples += 1

    def close(self) -> ShardInfo:
        self._tar.close()
        _fsync_file(self.tmp_path)
        index = index_path_for(self.path)
        index_tmp = index.with_name(index.name + ".tmp")
        write_dali_index(self.tmp_path, index_tmp)
        _fsync_file(index_tmp)
        os.replace(index_tmp, index)
        os.replace(self.tmp_path, self.path)
        return describe_shard(self.path, self.samples)

    def abort(self) -> None:
        """Drop a half-written shard (used on errors and interrupts)."""
        self._tar.close()
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


def describe_shard(tar_path: Path, samples: int) -> ShardInfo:
    """The manifest entry of a finished shard."""
    return ShardInfo(
        file=tar_path.name,
        index=index_path_for(tar_path).name,
        samples=samples,
        bytes=tar_path.stat().st_size,
        sha256=file_sha256(tar_path),
    )
