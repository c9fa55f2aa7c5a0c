"""eval/import_bin.py: InsightFace .bin packs in their published layouts -> verification shards, and
the restricted unpickler that refuses anything a pack never holds."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.cli import UserError, run_cli
from eval import import_bin
from eval.import_bin import identity_labels, main, read_pack
from eval.verification.shard_faces import read_jpeg, shard_jpegs
from shards.manifest import load_manifest

N_PAIRS = 25  # 10 folds of 2 or 3 pairs: checks the uneven split too


def _images(n: int, ext: str = ".jpg", size: tuple[int, int] = (112, 96)) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
        ok, buf = cv2.imencode(ext, cv2.resize(coarse, size[::-1], interpolation=cv2.INTER_CUBIC))
        assert ok
        out.append(buf.tobytes())
    return out


def _issame(n: int = N_PAIRS) -> list[bool]:
    return [bool(i % 3 != 1) for i in range(n)]


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as Python 2's str opcodes (BINSTRING), as packs made under Python 2 hold them."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_str2(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_str2


def _write(path: Path, obj: object, protocol: int, py2: bool = False) -> Path:
    buf = io.BytesIO()
    (_Py2Pickler(buf, protocol) if py2 else pickle.Pickler(buf, protocol)).dump(obj)
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize(
    ("protocol", "labels", "py2"),
    [
        (2, "list", True),
        (2, "numpy", True),
        (2, "list", False),
        (2, "numpy", False),
        (4, "list", False),
        (4, "numpy", False),
        (4, "numpy-scalars", False),
    ],
)
def test_pack_round_trips_pairs_folds_and_images(
    tmp_path: Path, protocol: int, labels: str, py2: bool
) -> None:
    images, same = _images(2 * N_PAIRS), _issame()
    issame = {"list": same, "numpy": np.array(same), "numpy-scalars": [np.bool_(v) for v in same]}[labels]
    pack = _write(tmp_path / "agedb_30.bin", (images, issame), protocol, py2)
    out = tmp_path / "shards"
    assert main(["--bin", str(pack), "--out", str(out)]) == 0
    m = load_manifest(out, verify="sha256")
    assert m.dataset == "agedb_30" and m.num_samples == 2 * N_PAIRS and m.image_size == (112, 96)
    assert [p.same for p in m.pairs] == same
    # 10 contiguous folds of consecutive pairs, the first 25 % 10 = 5 one pair longer.
    assert [p.fold for p in m.pairs] == [f for f in range(10) for _ in range(3 if f < 5 else 2)]
    members = shard_jpegs(m)
    for i, p in enumerate(m.pairs):
        assert read_jpeg(members[p.a]) == images[2 * i]  # JPEGs are kept byte for byte
        assert read_jpeg(members[p.b]) == images[2 * i + 1]


def test_png_pack_is_reencoded_as_jpeg(tmp_path: Path) -> None:
    images = _images(2 * N_PAIRS, ".png")
    pack = _write(tmp_path / "p.bin", (images, _issame()), 4)
    assert main(["--bin", str(pack), "--out", str(tmp_path / "s"), "--name", "cfp_fp"]) == 0
    m = load_manifest(tmp_path / "s")
    members = shard_jpegs(m)
    first = read_jpeg(members[m.pairs[0].a])
    assert first[:2] == b"\xff\xd8" and m.raw["reencoded"] == 2 * N_PAIRS
    back = cv2.imdecode(np.frombuffer(first, np.uint8), cv2.IMREAD_COLOR).astype(int)
    orig = cv2.imdecode(np.frombuffer(images[0], np.uint8), cv2.IMREAD_COLOR).astype(int)
    assert np.abs(back - orig).mean() < 3.0  # quality 95 of a smooth image


def test_labels_group_images_joined_by_genuine_pairs() -> None:
    # pairs (0,1) same, (2,3) different, (4,5) same
    assert identity_labels(np.array([True, False, True])).tolist() == [0, 0, 1, 2, 3, 3]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_pack_with_a_reduce_payload_is_refused_and_the_payload_does_not_run(
    tmp_path: Path, protocol: int, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "payload_ran"
    pack = _write(tmp_path / "evil.bin", (_images(2), [_Payload(marker)]), protocol)
    code = run_cli(main, ["--bin", str(pack), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "refused" in err and "system" in err and str(pack) in err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("obj", "what"),
    [
        ((["x"], np.array([1, "a"], dtype=object)), "dtype"),  # an object array: items could be anything
        (([b"x", b"y"], np.array([1], dtype=np.int64)), "dtype"),
        (([b"x", b"y"], {"a": 1}), "second item"),  # plain but not the layout
        (([b"x", b"y", b"z"], [True]), "3 images for 1 pairs"),
    ],
)
def test_other_contents_are_refused_in_one_line(tmp_path: Path, obj: object, what: str) -> None:
    pack = _write(tmp_path / "x.bin", obj, 4)
    with pytest.raises(UserError, match=what):
        read_pack(pack)


def test_damaged_and_missing_packs(tmp_path: Path) -> None:
    pack = _write(tmp_path / "ok.bin", (_images(2), [True]), 4)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(pack.read_bytes()[:-40])
    with pytest.raises(UserError, match="not a readable pickle"):
        read_pack(cut)
    with pytest.raises(UserError, match="no such file"):
        read_pack(tmp_path / "absent.bin")


def test_out_must_be_empty_unless_overwrite(tmp_path: Path) -> None:
    pack = _write(tmp_path / "lfw.bin", (_images(2 * N_PAIRS), _issame()), 4)
    out = tmp_path / "s"
    assert main(["--bin", str(pack), "--out", str(out)]) == 0
    with pytest.raises(UserError, match="not empty"):
        import_bin.run(["--bin", str(pack), "--out", str(out)])
    assert main(["--bin", str(pack), "--out", str(out), "--overwrite"]) == 0
    assert load_manifest(out, verify="sha256").num_samples == 2 * N_PAIRS


def _one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_fewer_pairs_than_folds_is_refused_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pack = _write(tmp_path / "tiny.bin", (_images(2 * 9), _issame(9)), 4)
    out = tmp_path / "s"
    err = _one_line(["--bin", str(pack), "--out", str(out)], capsys)
    assert str(pack) in err and "9 pairs, fewer than the 10 folds" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.bin"]


def test_a_pack_that_fails_half_way_leaves_the_old_set_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _write(tmp_path / "lfw.bin", (_images(2 * N_PAIRS), _issame()), 4)
    out = tmp_path / "s"
    assert main(["--bin", str(good), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    images = _images(2 * N_PAIRS)
    images[30] = b"not an image"
    bad = _write(tmp_path / "bad.bin", (images, _issame()), 4)
    err = _one_line(["--bin", str(bad), "--out", str(out), "--overwrite", "--name", "lfw"], capsys)
    assert "image 30 does not decode" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # shards and manifest as they were
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.bin", "lfw.bin", "s"]  # no staging left
    assert load_manifest(out, verify="sha256").num_samples == 2 * N_PAIRS
