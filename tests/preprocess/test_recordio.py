"""preprocess/recordio.py on damaged packs: every offset, length, count and label read from the
files is checked before use, and a bad one is a reject (or, for the files as a whole, one line)
naming the file, the record and what was wrong; split records are put back together as dmlc's
reader does."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from common.cli import UserError, run_cli
from preprocess import build_shards
from preprocess.recordio import MAGIC, read_ranges, read_rec
from tests import _damage
from tests._recordio_util import jpeg, write_rec

RECORD = 5  # an image record of class 0


def _rejects(root: Path) -> dict[str, tuple[str, str]]:
    """record path -> (reason, detail) of the entries read_rec refuses."""
    return {e.rel: (e.reason, e.detail) for e in read_rec(root).entries if e.reason is not None}


@pytest.fixture
def pack(tmp_path: Path) -> Path:
    root = tmp_path / "pack"
    root.mkdir()
    write_rec(root, per_class=(4, 3))
    return root


def _one_reject(root: Path, reason: str, *needles: str) -> str:
    rejects = _rejects(root)
    assert list(rejects) == [f"unreadable/{RECORD:09d}"], rejects
    got, detail = rejects[f"unreadable/{RECORD:09d}"]
    assert got == reason, detail
    for needle in (str(root / "train.rec"), f"record {RECORD}", *needles):
        assert needle in detail, detail
    return detail


@pytest.mark.parametrize("offset", [-8, -(10**30), 10**30, 2**63, "end"])
def test_an_index_offset_outside_the_file_is_a_reject(pack: Path, offset) -> None:
    size = (pack / "train.rec").stat().st_size
    offset = size - 4 if offset == "end" else offset
    _damage.set_rec_offset(pack / "train.rec", RECORD, offset)
    _one_reject(pack, "record_corrupt", f"offset {offset} is outside the file ({size} bytes)")


def test_an_index_offset_inside_another_record_is_a_reject(pack: Path) -> None:
    _damage.set_rec_offset(pack / "train.rec", RECORD, _damage.rec_offset(pack / "train.rec", RECORD) + 12)
    _one_reject(pack, "record_corrupt", "no RecordIO magic")


@pytest.mark.parametrize("length", [2**29 - 1, 2**20])
def test_a_length_past_the_end_is_a_reject(pack: Path, length: int) -> None:
    _damage.set_rec_length(pack / "train.rec", RECORD, length)
    _one_reject(pack, "record_truncated", f"{length}-byte record", "past the end")


@pytest.mark.parametrize("length", [0, 4, 23])
def test_a_length_shorter_than_the_header_is_a_reject(pack: Path, length: int) -> None:
    _damage.set_rec_length(pack / "train.rec", RECORD, length)
    _one_reject(pack, "record_corrupt", "shorter than its header")


def test_a_length_of_just_the_header_holds_no_image(pack: Path) -> None:
    _damage.set_rec_length(pack / "train.rec", RECORD, 24)
    _one_reject(pack, "record_corrupt", "holds no image")


@pytest.mark.parametrize("count", [2**31, 2**32 - 1, 10**6])
def test_a_label_count_beyond_the_record_is_a_reject(pack: Path, count: int) -> None:
    _damage.set_rec_label_count(pack / "train.rec", RECORD, count)
    _one_reject(pack, "record_corrupt", f"{count} labels")


@pytest.mark.parametrize("label", [math.inf, -math.inf, math.nan, -1.0, 1.5, 2.0, 3e38])
def test_a_label_that_is_no_class_is_a_reject(pack: Path, label: float) -> None:
    _damage.set_rec_label(pack / "train.rec", RECORD, label)  # property says 2 classes
    _one_reject(pack, "record_corrupt", "is not a class number 0..1")


@pytest.mark.parametrize("flag", [2, 3, 4, 7])
def test_a_record_that_starts_with_a_continuation_flag_is_a_reject(pack: Path, flag: int) -> None:
    length = struct.unpack_from(
        "<I", (pack / "train.rec").read_bytes(), _damage.rec_offset(pack / "train.rec", RECORD) + 4
    )[0]
    _damage.set_rec_length(pack / "train.rec", RECORD, length, flag)
    _one_reject(pack, "record_corrupt", f"part flag {flag}")


def test_a_first_part_without_its_continuation_is_a_reject(pack: Path) -> None:
    length = struct.unpack_from(
        "<I", (pack / "train.rec").read_bytes(), _damage.rec_offset(pack / "train.rec", RECORD) + 4
    )[0]
    length -= length % 4  # a first part is whole words; the next record (flag 0) follows
    _damage.set_rec_length(pack / "train.rec", RECORD, length, 1)
    _one_reject(pack, "record_corrupt", "part flag 0", "next part of the split record")


def _with_magic(data: bytes, copies: int) -> bytes:
    """A JPEG with a comment segment holding the magic word `copies` times at aligned offsets of the
    record's payload (the 24-byte IRHeader comes first): what makes dmlc split a record."""
    magic = struct.pack("<I", MAGIC)
    body = b"ab" + magic * copies + b"cd" * 3  # 24 + 2 (SOI) + 4 (COM, length) + 2 = 32: aligned
    return data[:2] + b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body + data[2:]


@pytest.mark.parametrize("copies", [1, 3])
def test_split_records_are_put_back_together(tmp_path: Path, capsys, copies: int) -> None:
    root = tmp_path / "pack"
    root.mkdir()
    rng = np.random.default_rng(7)
    split = {2: (0, _with_magic(jpeg(rng), copies)), 6: (1, _with_magic(jpeg(rng), 1))}
    images = write_rec(root, per_class=(4, 3), images=split)
    blob = (root / "train.rec").read_bytes()
    flags = struct.unpack_from("<I", blob, _damage.rec_offset(root / "train.rec", 2) + 4)[0] >> 29
    assert flags == 1  # the writer did split it
    entries = {e.rel.split("/")[1]: e for e in read_rec(root).entries}
    assert all(e.reason is None for e in entries.values())
    with open(root / "train.rec", "rb") as f:
        for index in split:
            assert read_ranges(f, entries[f"{index:09d}"].span) == images[index][1]
    out = tmp_path / "out"
    code = run_cli(build_shards.main, ["rec", "--root", str(root), "--out", str(out), "--workers", "1"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 7 and summary["rejects"] == 0


def test_a_damaged_offset_is_a_reject_of_the_build(pack: Path, tmp_path: Path, capsys) -> None:
    _damage.set_rec_offset(pack / "train.rec", RECORD, -(10**30))
    out = tmp_path / "out"
    argv = ["rec", "--root", str(pack), "--out", str(out), "--workers", "1", "--max-reject-fraction", "0.2"]
    assert run_cli(build_shards.main, argv) == 0, capsys.readouterr().err
    [reject] = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["path"] == f"unreadable/{RECORD:09d}" and "outside the file" in reject["detail"]


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (
            lambda root: _damage.set_rec_label(root / "train.rec", 0, math.inf, listed=True),
            "record 0 says the images end",
        ),
        (lambda root: _damage.set_rec_offset(root / "train.rec", 0, 10**30), "record 0 unreadable"),
        (lambda root: (root / "property").write_text("0,112,112\n"), "not an InsightFace property file"),
        (
            lambda root: (root / "train.idx").write_text("1\t0\n1\t8\n"),
            r"train\.idx:2: record 1 is listed twice",
        ),
    ],
)
def test_damage_to_the_pack_as_a_whole_is_one_line(pack: Path, damage, needle: str) -> None:
    damage(pack)
    with pytest.raises(UserError, match=needle) as err:
        read_rec(pack)
    assert "\n" not in str(err.value)
