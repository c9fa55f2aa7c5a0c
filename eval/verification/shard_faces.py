"""Which pairs to score and where their faces are: the manifest's pairs or a pairs.txt, checked
against the sample keys the shards actually hold (read from the DALI .idx files, no decoding)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common.cli import UserError
from preprocess.pairs_file import read_pairs
from shards.format import sample_key
from shards.manifest import MANIFEST_NAME, Manifest, Pair
from shards.sample_index import build_sample_table


@dataclass(frozen=True)
class Member:
    """Where a sample's aligned JPEG sits inside its shard."""

    shard: Path
    offset: int
    size: int


def shard_jpegs(manifest: Manifest) -> dict[str, Member]:
    """Sample key -> its JPEG member, from the .idx files (shards/sample_index.py parses them)."""
    for tar_path in manifest.shard_paths():
        if not tar_path.is_file():
            raise UserError(f"{tar_path}: shard listed in the manifest is missing")
    table = build_sample_table(manifest, want_keys=True)
    return {
        key: Member(table.shard_paths[int(s)], int(offset), int(size))
        for key, s, offset, size in zip(table.keys or [], table.shard, table.jpg_offset, table.jpg_size,
                                        strict=True)
    }


def read_jpeg(member: Member) -> bytes:
    with open(member.shard, "rb") as f:
        return os.pread(f.fileno(), member.size, member.offset)


def manifest_pairs(manifest: Manifest, keys: set[str] | dict[str, Member]) -> list[Pair]:
    """The manifest's LFW pairs, each of whose keys must be in the shards."""
    where = manifest.root / MANIFEST_NAME
    if not manifest.pairs:
        raise UserError(f"{where}: these shards hold no pairs (build them with "
                        "`build_shards.py lfw`, or pass --pairs FILE)")
    for i, p in enumerate(manifest.pairs):
        for key in (p.a, p.b):
            if key not in keys:
                raise UserError(f"{where}: pairs[{i}] names sample {key!r}, which is not in the shards")
    return list(manifest.pairs)


def read_pairs_file(path: Path, keys: set[str] | dict[str, Member]) -> list[Pair]:
    """A pairs.txt (formats: preprocess/pairs_file.py) resolved to sample keys in the shards."""
    out = []
    for p in read_pairs(path):
        a, b = sample_key(p.a), sample_key(p.b)
        for key in (a, b):
            if key not in keys:
                raise UserError(f"{path}:{p.line}: image {key!r} is not in the shards")
        out.append(Pair(a, b, p.same, p.fold))
    return out
