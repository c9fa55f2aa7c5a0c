"""manifest.json: what a shard folder holds, and the checks that it is all there and intact."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.cli import UserError
from common.fileio import atomic_write_text
from shards.format import FORMAT_NAME, FORMAT_VERSION

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    file: str
    index: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    same: bool
    fold: int


@dataclass
class Manifest:
    root: Path
    dataset: str
    split: str
    num_samples: int
    num_classes: int
    classes: list[str]
    image_size: tuple[int, int]
    shards: list[ShardInfo]
    pairs: list[Pair] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def shard_paths(self) -> list[Path]:
        return [self.root / s.file for s in self.shards]

    def index_paths(self) -> list[Path]:
        return [self.root / s.index for s in self.shards]


def write_manifest(shard_dir: Path | str, data: dict[str, Any]) -> Path:
    """Write manifest.json atomically (common.fileio: temp file, fsync, rename)."""
    text = json.dumps(data, indent=1, sort_keys=False) + "\n"
    return atomic_write_text(Path(shard_dir) / MANIFEST_NAME, text, what="shard manifest")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain_name(value: Any, where: str, path: Path) -> str:
    """A shard or index name must be a file name inside the shard folder: no folder part, no `..`."""
    if (
        not isinstance(value, str)
        or not value
        or value in (".", "..")
        or "/" in value
        or "\\" in value
        or "\0" in value
    ):
        raise UserError(
            f"{path}: {where} must be a plain file name inside the shard folder, not {str(value)[:80]!r}"
        )
    return value


def _count(value: Any, where: str, path: Path) -> int:
    """A count from the manifest: a whole number, 0 or more (JSON may hold anything there)."""
    if type(value) is not int or value < 0:
        raise UserError(f"{path}: {where} is {value!r}, not a count")
    return value


def _require(data: dict[str, Any], key: str, path: Path) -> Any:
    if key not in data:
        raise UserError(f"{path}: manifest has no '{key}' field")
    return data[key]


def load_manifest(shard_dir: Path | str, verify: str = "size") -> Manifest:
    """Load and check a shard folder's manifest.

    verify: "none"; "size" (every shard and index exists, shard byte sizes match);
    "sha256" (also the checksums: reads every byte, slow for big sets).
    """
    if verify not in ("none", "size", "sha256"):
        raise ValueError(f"verify must be none, size or sha256, not {verify!r}")
    root = Path(shard_dir)
    path = root / MANIFEST_NAME if root.is_dir() or not root.name.endswith(".json") else root
    root = path.parent
    if not path.is_file():
        raise UserError(f"{path}: no shard manifest here (build shards with preprocess/build_shards.py)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise UserError(f"{path}: not a {FORMAT_NAME} manifest")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(
            f"{path}: format_version {version!r} is not supported (this tool reads {FORMAT_VERSION})"
        )
    try:
        shards = [ShardInfo(**s) for s in _require(data, "shards", path)]
        for n, info in enumerate(shards):
            _plain_name(info.file, f"shards[{n}].file", path)
            _plain_name(info.index, f"shards[{n}].index", path)
            _count(info.samples, f"shards[{n}].samples", path)
            _count(info.bytes, f"shards[{n}].bytes", path)
        pairs = data.get("pairs")
        manifest = Manifest(
            root=root,
            dataset=str(_require(data, "dataset", path)),
            split=str(_require(data, "split", path)),
            num_samples=int(_require(data, "num_samples", path)),
            num_classes=int(_require(data, "num_classes", path)),
            classes=list(_require(data, "classes", path)),
            image_size=tuple(int(v) for v in _require(data, "image_size", path)),  # type: ignore[arg-type]
            shards=shards,
            pairs=[Pair(**p) for p in pairs] if pairs is not None else None,
            raw=data,
        )
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}: malformed manifest ({err})") from None
    if manifest.num_classes < 1:
        raise UserError(f"{path}: num_classes is {manifest.num_classes}, not a count of classes")
    if sum(s.samples for s in shards) != manifest.num_samples:
        raise UserError(f"{path}: shard sample counts do not add up to num_samples={manifest.num_samples}")
    if verify != "none":
        _verify_files(manifest, check_sha=verify == "sha256")
    return manifest


def _verify_files(manifest: Manifest, check_sha: bool) -> None:
    for info in manifest.shards:
        tar = manifest.root / info.file
        if not tar.is_file():
            raise UserError(f"{tar}: shard listed in the manifest is missing")
        if not (manifest.root / info.index).is_file():
            raise UserError(f"{manifest.root / info.index}: DALI index listed in the manifest is missing")
        size = tar.stat().st_size
        if size != info.bytes:
            raise UserError(f"{tar}: size {size} bytes, manifest says {info.bytes} (truncated or replaced?)")
        if check_sha and file_sha256(tar) != info.sha256:
            raise UserError(f"{tar}: sha256 does not match the manifest (corrupt shard)")
