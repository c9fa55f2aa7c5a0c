"""Text inputs as editors save them: a UTF-8 byte-order mark at the start of a landmark file, an
image list, a VGGFace2 CSV, a pairs file, a RecordIO index or property file is not part of the
first row (it used to make the first image's landmarks "missing": a valid face rejected)."""

from __future__ import annotations

from pathlib import Path

from preprocess.datasets import read_lfw_landmarks, read_vggface2
from preprocess.folders import read_folders
from preprocess.pairs_file import read_pairs
from preprocess.recordio import read_rec
from tests._recordio_util import write_rec

BOM = "\ufeff"
POINTS = "38 51 73 51 56 71 41 92 70 92"


def _bom(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(BOM + text, encoding="utf-8")
    return path


def test_a_landmark_file_with_a_bom_keeps_its_first_row(tmp_path: Path) -> None:
    lm = _bom(tmp_path / "lm.txt", f"ann/a1.jpg\t{POINTS}\nann/a2.jpg\t{POINTS}\n")
    assert sorted(read_lfw_landmarks(lm)) == ["ann/a1.jpg", "ann/a2.jpg"]
    for name in ("a1.jpg", "a2.jpg"):
        (tmp_path / "photos" / "ann").mkdir(parents=True, exist_ok=True)
        (tmp_path / "photos" / "ann" / name).write_bytes(b"x")
    entries = read_folders(tmp_path / "photos", lm).entries
    assert [(e.rel, e.reason) for e in entries] == [("ann/a1.jpg", None), ("ann/a2.jpg", None)]


def test_vggface2_csv_and_list_with_a_bom(tmp_path: Path) -> None:
    root = tmp_path / "vgg"
    for rel in ("n001/0001_01.jpg", "n001/0002_01.jpg"):
        (root / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "train" / rel).write_bytes(b"x")
    points = POINTS.replace(" ", ",")
    _bom(
        root / "bb_landmark" / "loose_landmark_train.csv",
        f'NAME_ID,P1X,P1Y,P2X,P2Y,P3X,P3Y,P4X,P4Y,P5X,P5Y\n"n001/0001_01",{points}\n"n001/0002_01",{points}\n',
    )
    _bom(root / "train_list.txt", "n001/0001_01.jpg\nn001/0002_01.jpg\n")
    entries = read_vggface2(root, "train").entries
    assert [(e.rel, e.reason) for e in entries] == [("n001/0001_01.jpg", None), ("n001/0002_01.jpg", None)]


def test_a_pairs_file_with_a_bom(tmp_path: Path) -> None:
    pairs = read_pairs(_bom(tmp_path / "pairs.txt", "1\t1\nAnn\t1\t2\nAnn\t1\tBob\t1\n"))
    assert [(p.same, p.fold) for p in pairs] == [(True, 0), (False, 0)]


def test_recordio_index_and_property_with_a_bom(tmp_path: Path) -> None:
    write_rec(tmp_path, per_class=(2, 2))
    for name in ("train.idx", "property"):
        _bom(tmp_path / name, (tmp_path / name).read_text())
    entries = read_rec(tmp_path).entries
    assert len(entries) == 4 and all(e.reason is None for e in entries)
