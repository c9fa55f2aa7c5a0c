"""Where a set's faces are: each sample key's aligned JPEG inside its shard, from the DALI .idx
files (no decoding), for the failures sheet of eval/lfw.py and for reading faces back byte for byte."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common.cli import UserError
from shards.manifest import Manifest
from shards.sample_index import SampleTable, build_sample_table


@dataclass(frozen=True)
class Member:
    """Where a sample's aligned JPEG sits inside its shard."""

    shard: Path
    offset: int
    size: int


def sample_table(manifest: Manifest) -> SampleTable:
    """The shards' sample table with keys; a shard the manifest lists but the folder lacks is one line
    here, before anything is read."""
    for tar_path in manifest.shard_paths():
        if not tar_path.is_file():
            raise UserError(f"{tar_path}: shard listed in the manifest is missing")
    return build_sample_table(manifest, want_keys=True)


def shard_jpegs(manifest: Manifest) -> dict[str, Member]:
    """Sample key -> its JPEG member, from the .idx files (shards/sample_index.py parses them)."""
    table = sample_table(manifest)
    return {
        key: Member(table.shard_paths[int(s)], int(offset), int(size))
        for key, s, offset, size in zip(
            table.keys or [], table.shard, table.jpg_offset, table.jpg_size, strict=True
        )
    }


def read_jpeg(member: Member) -> bytes:
    with open(member.shard, "rb") as f:
        return os.pread(f.fileno(), member.size, member.offset)
