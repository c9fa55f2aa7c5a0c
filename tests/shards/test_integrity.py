"""Damaged shards are caught when read, by every reader, with one line naming the shard and sample:
a label out of range, a label or JPEG byte changed in place (the per-sample CRC32), an image that
does not decode, and a manifest path that leaves the shard folder. Old shards without CRC32 load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.cli import UserError
from shards import writer as shard_writer
from shards.loader import build_train_loader, iter_eval_batches
from shards.manifest import load_manifest
from tests import _damage
from tests._loader_util import make_shards

READERS = ["torch", "dali", "eval"]
KEY = "id006__img_00006"  # sample 6: the third sample of the second shard (sizes 4, 5), label 6


def _read_all(root: Path, reader: str) -> list:
    manifest = load_manifest(root)
    if reader == "eval":
        return list(iter_eval_batches(manifest, batch_size=3))
    return list(
        build_train_loader(
            manifest, batch_size=3, backend=reader, workers=0 if reader == "torch" else 1, augment=None
        )
    )


def _one_line(root: Path, reader: str, *needles: str) -> str:
    with pytest.raises(UserError) as err:
        _read_all(root, reader)
    msg = str(err.value)
    assert "\n" not in msg and str(root / "train-000001.tar") in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.fixture
def old_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards as written before the CRC32 field: the record carries no `crc32`."""
    monkeypatch.setattr(shard_writer, "CRC_FIELD", "not_a_crc")


@pytest.mark.parametrize("reader", READERS)
def test_changed_members_fail_their_crc(tmp_path: Path, reader: str) -> None:
    root = make_shards(tmp_path / "s", [4, 5])
    assert len(_read_all(root, reader)) == 3
    shutil.copyfile(root / "train-000001.tar", tmp_path / "good.tar")
    _damage.set_label(root / "train-000001.tar", KEY, 2)  # within range: only the CRC sees it
    _one_line(root, reader, "sample 6", "lbl member does not match its CRC32")
    _damage.set_label(root / "train-000001.tar", KEY, 6)  # restored
    _damage.flip_jpeg_byte(root / "train-000001.tar", KEY)
    _one_line(root, reader, "sample 6", "jpg member does not match its CRC32")
    shutil.copyfile(tmp_path / "good.tar", root / "train-000001.tar")
    _damage.garble_crc_field(root / "train-000001.tar", KEY)
    _one_line(root, reader, "sample 6", "corrupt sample record")


@pytest.mark.parametrize("reader", READERS)
def test_old_shards_load_and_labels_are_range_checked(tmp_path: Path, reader: str, old_format: None) -> None:
    root = make_shards(tmp_path / "s", [4, 5])
    labels = sorted(int(v) for batch in _read_all(root, reader) for v in batch[-1])
    assert labels == sorted(i % 7 for i in range(9))  # 9 samples, 3 full batches: each read once
    _damage.set_label(root / "train-000001.tar", KEY, 99)
    _one_line(root, reader, "sample 6", "label 99 is outside 0..6")
    _damage.set_label(root / "train-000001.tar", KEY, -1)
    _one_line(root, reader, "label -1 is outside")


@pytest.mark.parametrize("reader", READERS)
def test_an_image_that_does_not_decode_is_one_line(tmp_path: Path, reader: str) -> None:
    root = make_shards(tmp_path / "s", [4, 5], not_jpeg=frozenset({6}))
    _one_line(root, reader, "sample 6", "JPEG")


@pytest.mark.parametrize("field", ["file", "index"])
@pytest.mark.parametrize("value", ["../elsewhere.tar", "/etc/passwd", "sub/train-000000.tar", "..", ""])
def test_manifest_paths_stay_in_the_shard_folder(tmp_path: Path, field: str, value: str) -> None:
    root = make_shards(tmp_path / "s", [4, 5])
    (tmp_path / "elsewhere.tar").write_bytes((root / "train-000000.tar").read_bytes())
    _damage.set_manifest_path(root, 1, field, value)
    want = rf"manifest.json: shards\[1\]\.{field} must be a plain file name"
    for verify in ("none", "size"):
        with pytest.raises(UserError, match=want):
            load_manifest(root, verify=verify)


def test_a_garbage_index_is_one_line_without_its_content(tmp_path: Path) -> None:
    root = make_shards(tmp_path / "s", [4, 5])
    idx = root / "train-000001.idx"
    idx.write_text("root:x:0:0:root:/root:/bin/bash\n" + "garbage\n" * 5)
    with pytest.raises(UserError, match=r"train-000001\.idx:1: not a DALI webdataset index") as err:
        _read_all(root, "eval")
    assert "root:x" not in str(err.value)
    idx.write_text("v1.2 5\n" + "jpg x 3 a.jpg\n" * 5)
    with pytest.raises(UserError, match=r"train-000001\.idx:2: offset and size .* must be integers"):
        _read_all(root, "eval")
