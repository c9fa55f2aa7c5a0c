"""One verification set's pairs: from its manifest or any pairs file, resolved against its shards.

Pairs files come in these forms, told apart by their first line:
- View 2: header `<folds> <n>` (`10 300`), then per fold n `name i j` and n `name1 i name2 j` lines;
- View 1: header `<n>` (`500`), or no header: one fold (these three: preprocess/pairs_file.py);
- a plain list for private data: `path_a path_b same` lines (`same` is 1/0 or true/false; paths are
  relative to the image root the shards were built from, or sample keys; `#` starts a comment).
One-fold sources need `--folds K`: fold k then takes the k-th of K contiguous blocks of the genuine
pairs and the k-th of the impostor pairs (file order), so every fold stays as balanced as View 2's.
A set whose pairs are all of one kind is refused: AUC and the threshold are undefined for it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common.cli import UserError
from preprocess.pairs_file import read_pairs
from shards.format import sample_key
from shards.manifest import MANIFEST_NAME, Manifest, Pair

_TRUE = {"1", "true", "same", "yes"}
_FALSE = {"0", "false", "diff", "no"}


def contiguous_folds(n: int, k: int) -> np.ndarray:
    """Fold id per item: k contiguous blocks, the first n % k one item longer (sklearn KFold order)."""
    if k < 2 or k > n:
        raise ValueError(f"cannot split {n} pairs into {k} folds")
    sizes = [n // k + (1 if f < n % k else 0) for f in range(k)]
    return np.repeat(np.arange(k), sizes)


@dataclass
class PairSet:
    """The pairs to score for one set, and what was left out on the way."""

    pairs: list[Pair]
    source: str  # the file the pairs come from, for messages
    skipped: int = 0


def _is_plain_list(path: Path) -> bool:
    """A plain list's first line is `path_a path_b same`; pairs.txt forms start with a header or
    `name i j` / `name1 i name2 j` (image numbers), which preprocess/pairs_file.py reads."""
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line.split() for line in f if line.strip() and not line.startswith("#")), [])
    except FileNotFoundError:
        raise UserError(f"{path}: pairs file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable pairs file ({err})") from None
    if not first:
        raise UserError(f"{path}: the pairs file is empty")
    return len(first) == 3 and not first[1].isdigit()


def read_plain_list(path: Path) -> tuple[list[Pair], list[int]]:
    """`path_a path_b same` lines, all in fold 0; and their line numbers."""
    out, lines = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        f = line.split("#", 1)[0].split()
        if not f:
            continue
        if len(f) != 3 or f[2].lower() not in _TRUE | _FALSE:
            raise UserError(
                f"{path}:{n}: expected 'path_a path_b same' with same 1/0 or true/false, got {line.strip()!r}"
            )
        out.append(Pair(sample_key(f[0]), sample_key(f[1]), f[2].lower() in _TRUE, 0))
        lines.append(n)
    if not out:
        raise UserError(f"{path}: the pairs file holds no pairs")
    return out, lines


def read_any_pairs(path: Path) -> tuple[list[Pair], list[int]]:
    """Pairs (sample keys, folds) of a View 2, View 1, headerless or plain pairs file, not yet checked
    against any shards; and each pair's line number."""
    if _is_plain_list(path):
        return read_plain_list(path)
    lines = read_pairs(path)  # the one pairs.txt reader
    return ([Pair(sample_key(p.a), sample_key(p.b), p.same, p.fold) for p in lines], [p.line for p in lines])


def split_folds(pairs: list[Pair], k: int) -> list[Pair]:
    """One fold -> k: the k-th contiguous block of the genuine and of the impostor pairs form fold k."""
    same = np.array([p.same for p in pairs], dtype=bool)
    fold = np.zeros(len(pairs), dtype=np.int64)
    for kind in (same, ~same):
        idx = np.flatnonzero(kind)
        fold[idx] = contiguous_folds(len(idx), k)
    return [replace(p, fold=int(f)) for p, f in zip(pairs, fold, strict=True)]


def resolve(
    pairs: list[Pair], keys: set[str] | dict, source: str, skip_missing: bool, lines: list[int] | None = None
) -> PairSet:
    """Pairs whose two faces are in the shards; a missing face is an error unless skip_missing."""
    kept = [p for p in pairs if p.a in keys and p.b in keys]
    if len(kept) != len(pairs) and not skip_missing:
        i = next(i for i, p in enumerate(pairs) if p.a not in keys or p.b not in keys)
        key = pairs[i].a if pairs[i].a not in keys else pairs[i].b
        where = f"{source}:{lines[i]}" if lines else f"{source}: pairs[{i}]"
        raise UserError(
            f"{where}: image {key!r} is not in the shards ({len(pairs) - len(kept)} pairs "
            "name absent images; --skip-missing scores the others)"
        )
    if not kept:
        raise UserError(f"{source}: none of the {len(pairs)} pairs have both images in the shards")
    return PairSet(kept, source, len(pairs) - len(kept))


def set_pairs(
    manifest: Manifest,
    keys: set[str] | dict,
    pairs_file: Path | None = None,
    folds: int | None = None,
    skip_missing: bool = False,
) -> PairSet:
    """The pairs a set is scored on: the manifest's, or a pairs file's; one fold split by `folds`."""
    lines = None
    if pairs_file is not None:
        (raw, lines), source = read_any_pairs(pairs_file), str(pairs_file)
    else:
        source = str(manifest.root / MANIFEST_NAME)
        if not manifest.pairs:
            raise UserError(
                f"{source}: these shards hold no pairs (import a .bin, build them with "
                "`build_shards.py lfw`, or name a pairs file)"
            )
        raw = list(manifest.pairs)
    result = resolve(raw, keys, source, skip_missing, lines)
    same = np.array([p.same for p in result.pairs], dtype=bool)
    if same.all() or not same.any():
        kind = "same-person" if same.all() else "different-person"
        raise UserError(
            f"{source}: all {len(same)} pairs are {kind} pairs; AUC and the threshold need both kinds"
        )
    n_folds = len({p.fold for p in result.pairs})
    if folds is not None and n_folds == 1:  # sets that have their folds keep them
        minority = int(min(same.sum(), (~same).sum()))
        if not 2 <= folds <= minority:
            raise UserError(
                f"{source}: --folds {folds}: needs 2 to {minority} folds "
                "(each fold takes at least one pair of each kind)"
            )
        result.pairs = split_folds(result.pairs, folds)
    elif n_folds < 2:
        raise UserError(
            f"{source}: the pairs form one fold (View 1 or a plain list); pass --folds K "
            "to split them into K contiguous folds (10 as the standard protocol)"
        )
    return result
