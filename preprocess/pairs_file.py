"""The one reader of LFW's `pairs.txt` format (used by preprocess/datasets.py and
eval/verification/pairsets.py).

Accepted headers:
- View 2 (`pairs.txt`): `<folds> <n>`, then per fold n genuine and n impostor lines;
- View 1 (`pairsDevTrain.txt`, `pairsDevTest.txt`): one number `<n>`, a single fold of n genuine
  then n impostor lines;
- no header: every line is a pair, all in one fold.
Pair lines: `name i j` (two images of one person) or `name1 i name2 j` (two people; the second
image is read under the second name). Errors are one UserError line naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.cli import UserError
from common.fileio import TEXT_ENCODING


@dataclass(frozen=True)
class PairLine:
    a: str  # image paths relative to the LFW image root: `Name/Name_0001.jpg`
    b: str
    same: bool
    fold: int
    line: int  # 1-based line number in the file, for error messages


def lfw_rel(name: str, number: str) -> str:
    return f"{name}/{name}_{int(number):04d}.jpg"


def _header(fields: list[str]) -> tuple[int, int] | None:
    """(folds, pairs per fold) of a header line; None when the line is already a pair."""
    if len(fields) in (3, 4):
        return None
    if len(fields) == 2:
        return int(fields[0]), int(fields[1])
    if len(fields) == 1:
        return 1, int(fields[0])
    raise ValueError


def _pair(fields: list[str], where: str) -> tuple[str, str, bool]:
    try:
        if len(fields) == 3:
            return lfw_rel(fields[0], fields[1]), lfw_rel(fields[0], fields[2]), True
        if len(fields) == 4:
            return lfw_rel(fields[0], fields[1]), lfw_rel(fields[2], fields[3]), False
    except ValueError:
        raise UserError(f"{where}: image numbers must be integers: {' '.join(fields)!r}") from None
    raise UserError(
        f"{where}: {len(fields)} fields; expected 'name i j' (same person) "
        "or 'name1 i name2 j' (different people)"
    )


def read_pairs(path: Path | str) -> list[PairLine]:
    """Every pair of a pairs file, in file order, with its fold (see the module docs)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding=TEXT_ENCODING).splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: pairs file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable pairs file ({err})") from None
    lines = [(n, line.split()) for n, line in enumerate(raw, start=1) if line.strip()]
    if not lines:
        raise UserError(f"{path}: the pairs file is empty")
    hline, first = lines[0]
    try:
        header = _header(first)
    except ValueError:
        raise UserError(
            f"{path}:{hline}: expected a header '<folds> <pairs per fold>' or '<pairs>'"
        ) from None
    if header is None:  # no header: one fold of whatever the lines hold
        body, per_fold = lines, len(lines)
    else:
        (folds, per_fold), body = header, lines[1:]
        if folds <= 0 or per_fold <= 0 or len(body) != folds * per_fold * 2:
            raise UserError(
                f"{path}:{hline}: header says {folds} folds x {per_fold} genuine + "
                f"{per_fold} impostor pairs, the file has {len(body)} pair lines"
            )
        per_fold *= 2
    return [
        PairLine(*_pair(fields, f"{path}:{n}"), fold=i // per_fold, line=n)
        for i, (n, fields) in enumerate(body)
    ]
