"""preprocess/pairs_file.py, the one pairs.txt reader: View 2, View 1 and headerless files."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.cli import UserError
from preprocess.pairs_file import read_pairs

SAME, DIFF = "A\t1\t2", "A\t1\tB\t3"


def _file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "pairs.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_view2_header_gives_folds(tmp_path: Path) -> None:
    pairs = read_pairs(_file(tmp_path, "2\t1", SAME, DIFF, SAME, DIFF))
    assert [(p.same, p.fold, p.line) for p in pairs] == [
        (True, 0, 2),
        (False, 0, 3),
        (True, 1, 4),
        (False, 1, 5),
    ]
    assert (pairs[1].a, pairs[1].b) == ("A/A_0001.jpg", "B/B_0003.jpg")  # the second name


def test_view1_one_number_header_is_one_fold_of_that_many(tmp_path: Path) -> None:
    pairs = read_pairs(_file(tmp_path, "2", SAME, SAME, DIFF, DIFF))
    assert [(p.same, p.fold) for p in pairs] == [(True, 0), (True, 0), (False, 0), (False, 0)]
    with pytest.raises(UserError, match=r"pairs.txt:1: header says 1 folds x 3 genuine"):
        read_pairs(_file(tmp_path, "3", SAME, SAME, DIFF, DIFF))


def test_headerless_file_is_one_fold(tmp_path: Path) -> None:
    pairs = read_pairs(_file(tmp_path, SAME, DIFF, DIFF))
    assert [(p.same, p.fold, p.line) for p in pairs] == [(True, 0, 1), (False, 0, 2), (False, 0, 3)]


@pytest.mark.parametrize(
    "lines, where, what",
    [
        (("",), "pairs.txt", "empty"),
        (("1 2 3 4 5",), "pairs.txt:1:", "header"),
        (("1\t1", SAME, "A\t1"), "pairs.txt:3:", "2 fields"),
        (("1\t1", "A\tx\t2", DIFF), "pairs.txt:2:", "integers"),
        (("0\t1",), "pairs.txt:1:", "0 folds"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, lines: tuple[str, ...], where: str, what: str) -> None:
    with pytest.raises(UserError, match=what) as err:
        read_pairs(_file(tmp_path, *lines))
    assert where in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="not found"):
        read_pairs(tmp_path / "none.txt")
