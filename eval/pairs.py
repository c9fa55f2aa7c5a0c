"""Which pairs to score and where their faces are: the manifest's pairs or a pairs.txt, checked
against the sample keys the shards actually hold (read from the DALI .idx files, no decoding)."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from shards.errors import UserError
from shards.format import sample_key
from shards.manifest import MANIFEST_NAME, Manifest, Pair


@dataclass(frozen=True)
class Member:
    """Where a sample's aligned JPEG sits inside its shard."""

    shard: Path
    offset: int
    size: int


def _key_ext(member_name: str) -> tuple[str, str]:
    base_start = member_name.rfind("/") + 1
    dot = member_name.find(".", base_start)
    return member_name[:dot], member_name[dot + 1:]


def shard_jpegs(manifest: Manifest) -> dict[str, Member]:
    """Sample key -> its JPEG member, from the .idx files (falls back to the tar headers)."""
    out: dict[str, Member] = {}
    for tar_path, idx_path in zip(manifest.shard_paths(), manifest.index_paths(), strict=True):
        if not tar_path.is_file():
            raise UserError(f"{tar_path}: shard listed in the manifest is missing")
        try:
            lines = idx_path.read_text(encoding="ascii").splitlines()[1:]
            for line in lines:
                f = line.split()
                for i in range(0, len(f) - 3, 4):  # groups of: ext offset size name
                    if f[i] == "jpg":
                        key, _ = _key_ext(f[i + 3])
                        out[key] = Member(tar_path, int(f[i + 1]), int(f[i + 2]))
        except (OSError, ValueError, UnicodeDecodeError):
            with tarfile.open(tar_path, "r:") as tar:
                for m in tar:
                    key, ext = _key_ext(m.name)
                    if m.isfile() and ext == "jpg":
                        out[key] = Member(tar_path, m.offset_data, m.size)
    return out


def read_jpeg(member: Member) -> bytes:
    with open(member.shard, "rb") as f:
        f.seek(member.offset)
        return f.read(member.size)


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


def _lfw_key(name: str, number: str) -> str:
    return sample_key(f"{name}/{name}_{int(number):04d}.jpg")


def read_pairs_file(path: Path, keys: set[str] | dict[str, Member]) -> list[Pair]:
    """A pairs.txt in the standard format, resolved to sample keys.

    Header `<folds> <n>` (or a single count: one fold), then per fold n genuine lines `name i j`
    and n impostor lines `name1 i name2 j`. The impostor's second image is read under the second
    name (the reference evaluator used the first name for both).
    """
    try:
        raw = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: pairs file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable pairs file ({err})") from None
    lines = [(n, line.split()) for n, line in enumerate(raw, start=1) if line.strip()]
    if not lines:
        raise UserError(f"{path}: the pairs file is empty")
    (hline, header), body = lines[0], lines[1:]
    try:
        if len(header) == 2:
            folds, per_fold = int(header[0]), int(header[1])
        elif len(header) == 1:
            folds, per_fold = 1, int(header[0])
        else:
            raise ValueError
    except ValueError:
        raise UserError(f"{path}:{hline}: expected a header '<folds> <pairs per fold>'") from None
    if folds <= 0 or per_fold <= 0 or len(body) != folds * per_fold * 2:
        raise UserError(f"{path}:{hline}: header says {folds} folds x {per_fold} genuine + "
                        f"{per_fold} impostor pairs, the file has {len(body)} pair lines")
    out = []
    for i, (n, f) in enumerate(body):
        try:
            if len(f) == 3:
                pair = (_lfw_key(f[0], f[1]), _lfw_key(f[0], f[2]), True)
            elif len(f) == 4:
                pair = (_lfw_key(f[0], f[1]), _lfw_key(f[2], f[3]), False)
            else:
                raise UserError(f"{path}:{n}: {len(f)} fields; expected 'name i j' (same person) "
                                "or 'name1 i name2 j' (different people)")
        except ValueError:
            raise UserError(f"{path}:{n}: image numbers must be integers: {' '.join(f)!r}") from None
        for key in pair[:2]:
            if key not in keys:
                raise UserError(f"{path}:{n}: image {key!r} is not in the shards")
        out.append(Pair(pair[0], pair[1], pair[2], i // (2 * per_fold)))
    return out
