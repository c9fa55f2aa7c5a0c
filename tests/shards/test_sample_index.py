"""shards/sample_index.py: every offset and size a `.idx` gives is checked against its tar before
any reader seeks to it, and the manifest's counts before they are used: one line naming the file
and the line, for the training loader, the evaluation batches and the LFW pair reader alike (they
all read the shards through the sample table)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.cli import UserError
from eval.verification.shard_faces import shard_jpegs
from shards.loader import build_train_loader, iter_eval_batches
from shards.manifest import MANIFEST_NAME, load_manifest
from shards.writer import ShardWriter
from tests import _damage
from tests._loader_util import make_shards

KEY = "id006__img_00006"  # the third sample of the second shard: line 4 of train-000001.idx


def _readers(root: Path):
    manifest = load_manifest(root, verify="none")
    yield lambda: list(build_train_loader(manifest, batch_size=3, backend="torch", workers=0, augment=None))
    yield lambda: list(iter_eval_batches(manifest, batch_size=3))
    yield lambda: shard_jpegs(manifest)


@pytest.mark.parametrize(
    ("ext", "field", "value", "needle"),
    [
        ("jpg", "offset", "0", "not laid out as in a tar"),  # before its header: a negative seek
        ("jpg", "offset", "100", "not laid out as in a tar"),
        ("jpg", "offset", str(10**30), "runs past the end of the tar"),  # no int64 holds it
        ("jpg", "size", str(2**63), "runs past the end of the tar"),
        ("jpg", "size", "up to lbl", "not laid out as in a tar"),  # over the lbl member's header
        ("lbl", "offset", "512", "not laid out as in a tar"),
        ("lbl", "size", "5", "not laid out as in a tar"),
        ("json", "offset", "1024", "not laid out as in a tar"),
        ("json", "size", "999999", "runs past the end of the tar"),
    ],
)
def test_an_index_offset_or_size_that_does_not_fit_the_tar_is_one_line(
    tmp_path: Path, ext: str, field: str, value: str, needle: str
) -> None:
    root = make_shards(tmp_path / "s", [4, 5])
    if value == "up to lbl":
        jpg, lbl = (_damage.member_offset(root / "train-000001.tar", f"{KEY}.{e}") for e in ("jpg", "lbl"))
        value = str(lbl - jpg)
    _damage.set_index_field(root / "train-000001.tar", KEY, ext, field, value)
    for read in _readers(root):
        with pytest.raises(UserError) as err:
            read()
        msg = str(err.value)
        assert "\n" not in msg and f"{root / 'train-000001.idx'}:4:" in msg and needle in msg, msg


def test_the_checks_pass_every_index_the_writer_writes(tmp_path: Path) -> None:
    root = make_shards(tmp_path / "s", [4, 5, 1])
    for read in _readers(root):
        assert read()


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (("shards", 1, "samples"), -5, r"shards\[1\]\.samples is -5, not a count"),
        (("shards", 1, "samples"), "5", r"shards\[1\]\.samples is '5', not a count"),
        (("shards", 0, "bytes"), 1.5, r"shards\[0\]\.bytes is 1.5, not a count"),
        (("num_classes",), 0, "num_classes is 0"),
    ],
)
def test_a_manifest_count_that_is_no_count_is_one_line(
    tmp_path: Path, path: tuple, value, needle: str
) -> None:
    root = make_shards(tmp_path / "s", [4, 5])
    data = json.loads((root / MANIFEST_NAME).read_text())
    target = data
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    (root / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(UserError, match=needle):
        load_manifest(root, verify="none")


def test_a_sample_key_listed_twice_is_one_line_for_readers_by_key(tmp_path: Path) -> None:
    root = make_shards(tmp_path / "s", [4, 5])
    with ShardWriter(root / "train-000001.tar") as w:  # the second shard again, its last key twice
        for i in range(5):
            w.add(f"id{(4 + min(i, 3)) % 7:03d}__img_{4 + min(i, 3):05d}", b"\xff\xd8 jpeg", (4 + i) % 7, {})
        info = w.close()
    data = json.loads((root / MANIFEST_NAME).read_text())
    data["shards"][1] = info.__dict__
    (root / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"train-000001\.idx: sample key id000__img_00007 is listed twice"):
        shard_jpegs(load_manifest(root))
