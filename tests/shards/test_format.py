"""The shard format: keys, label encoding, deterministic tars, DALI indexes and manifest checks."""

from __future__ import annotations

import json
import tarfile
import zlib
from pathlib import Path

import pytest

from common.cli import UserError, run_cli
from shards.format import FORMAT_NAME, FORMAT_VERSION, decode_label, encode_label, sample_key, scaled_template
from shards.manifest import file_sha256, load_manifest, write_manifest
from shards.writer import ShardWriter


def _write_shard(path: Path, count: int, first_label: int = 0):
    with ShardWriter(path) as writer:
        for i in range(count):
            jpeg = bytes([i % 256]) * (100 + i)  # any payload: the writer does not decode
            # Every third key is over tar's 100-character name field (GNU long-name header blocks).
            key = f"id{i:03d}__img_{i}" + ("_long" * 25 if i % 3 == 2 else "")
            writer.add(key, jpeg, first_label + i, {"identity": f"id{i:03d}", "label": i})
        return writer.close()


def _manifest(root: Path, infos: list) -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dataset": "test",
        "split": "train",
        "num_samples": sum(i.samples for i in infos),
        "num_classes": 3,
        "classes": ["a", "b", "c"],
        "image_size": [112, 112],
        "shards": [i.__dict__ for i in infos],
    }


def test_sample_key_is_stable_and_has_no_dots():
    assert sample_key("n000002/0001_01.jpg") == "n000002__0001_01"
    assert sample_key("Aaron_Eckhart/Aaron_Eckhart_0001.jpg") == "Aaron_Eckhart__Aaron_Eckhart_0001"
    assert "." not in sample_key("a.b/c.d.jpg")


@pytest.mark.parametrize(
    "rel",
    [
        "a/b.jpg",
        "a.b/c",
        "a/.hidden",
        "a/b.",
        "a/b..jpg",
        "b.tar.gz",
        "./a/b.jpg",
        "a//b.jpg",
        "a/./b.jpg",
        "a/",
        "a/b/",
        ".",
        "",
        "a/../b.jpg",
        "/abs/x.png",
        "x",
        "my photos/ä.jpg",
        "a\\b.jpg",
        "a.b.c/d.e.f",
    ],
)
def test_sample_key_strips_the_suffix_as_pathlib_does(rel):
    """The per-sample fast path keeps the keys pathlib's suffix rule gave (existing shards keep theirs)."""
    import re
    from pathlib import PurePosixPath

    path = PurePosixPath(rel.replace("\\", "/"))
    stem = str(path.with_suffix("")) if path.suffix else str(path)
    expected = re.sub(
        r"[^\x21-\x7d]",
        lambda m: "".join(f"~{b:02x}" for b in m.group().encode()),
        stem.replace("/", "__").replace(".", "_"),
    )
    assert sample_key(rel) == expected


@pytest.mark.parametrize("label", [0, 1, 8630, 2**31 - 1])
def test_label_round_trip_is_four_bytes(label):
    data = encode_label(label)
    assert len(data) == 4 and decode_label(data) == label


def test_bad_label_length_is_rejected():
    with pytest.raises(ValueError, match="4"):
        decode_label(b"12")


def test_template_scales_with_image_size():
    assert scaled_template((112, 112))[0] == pytest.approx([38.2946, 51.6963])
    assert scaled_template((224, 224))[4] == pytest.approx([70.7299 * 2, 92.2041 * 2])
    # Non-square keeps the face's proportions: 112x96 is the 112x112 template shifted 8 px left.
    assert scaled_template((112, 96))[0] == pytest.approx([38.2946 - 8, 51.6963])
    assert scaled_template((224, 192))[2] == pytest.approx([56.0252 * 2 - 16, 71.7366 * 2])


def test_writer_is_deterministic_and_atomic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _write_shard(a / "s-000000.tar", 7)
    _write_shard(b / "s-000000.tar", 7)
    assert file_sha256(a / "s-000000.tar") == file_sha256(b / "s-000000.tar")
    assert (a / "s-000000.idx").read_bytes() == (b / "s-000000.idx").read_bytes()
    assert not list(a.glob("*.tmp"))


def test_index_offsets_point_at_member_data(tmp_path):
    tar_path = tmp_path / "s-000000.tar"
    info = _write_shard(tar_path, 5)
    # Size and hash are computed while writing; they must be those of the file on disk.
    assert (info.bytes, info.sha256) == (tar_path.stat().st_size, file_sha256(tar_path))
    lines = (tmp_path / "s-000000.idx").read_text().splitlines()
    assert lines[0] == "v1.2 5"
    raw = tar_path.read_bytes()
    with tarfile.open(tar_path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    for line in lines[1:]:
        fields = line.split()
        assert [fields[i] for i in range(0, len(fields), 4)] == ["jpg", "lbl", "json"]
        for _ext, offset, size, name in zip(*[iter(fields)] * 4):
            assert raw[int(offset) : int(offset) + int(size)] == members[name]


def test_aborted_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "s-000000.tar") as writer:
            writer.add("k", b"x", 0, {})
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_manifest_round_trip_and_checks(tmp_path):
    infos = []
    for n, count in enumerate((4, 3)):
        path = tmp_path / f"s-{n:06d}.tar"
        with ShardWriter(path) as writer:
            for i in range(count):
                writer.add(f"k{n}_{i}", b"jpeg" * (i + 1), i, {})
            infos.append(writer.close())
    write_manifest(tmp_path, _manifest(tmp_path, infos))
    manifest = load_manifest(tmp_path, verify="sha256")
    assert manifest.num_samples == 7 and manifest.image_size == (112, 112)
    assert [p.name for p in manifest.shard_paths()] == ["s-000000.tar", "s-000001.tar"]

    # Corrupt a byte without changing the size: only the checksum sees it.
    data = bytearray((tmp_path / "s-000001.tar").read_bytes())
    data[600] ^= 0xFF
    (tmp_path / "s-000001.tar").write_bytes(bytes(data))
    load_manifest(tmp_path, verify="size")
    with pytest.raises(UserError, match=r"s-000001\.tar: sha256"):
        load_manifest(tmp_path, verify="sha256")

    (tmp_path / "s-000001.tar").write_bytes(bytes(data[:1024]))
    with pytest.raises(UserError, match=r"s-000001\.tar: size 1024 bytes"):
        load_manifest(tmp_path)

    (tmp_path / "s-000001.tar").unlink()
    with pytest.raises(UserError, match=r"s-000001\.tar: shard listed in the manifest is missing"):
        load_manifest(tmp_path)


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="no shard manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="manifest.json: unreadable"):
        load_manifest(tmp_path)
    data = _manifest(tmp_path, [])
    data["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="format_version 99 is not supported"):
        load_manifest(tmp_path)


def test_run_cli_turns_user_errors_into_one_line(capsys):
    def main(argv):
        raise UserError("data/x.tar: broken")

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err == "error: data/x.tar: broken\n"
    assert run_cli(lambda argv: 0, []) == 0


def test_every_record_carries_the_crc32_of_its_members(tmp_path):
    tar_path = tmp_path / "s-000000.tar"
    with ShardWriter(tar_path) as writer:
        writer.add("k0", b"jpeg bytes", 2, {"identity": "a", "crc32": "stale"})  # the writer's own wins
        writer.close()
    with tarfile.open(tar_path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    record = json.loads(members["k0.json"])
    assert record["crc32"] == {"jpg": zlib.crc32(b"jpeg bytes"), "lbl": zlib.crc32(encode_label(2))}
    assert record["identity"] == "a"
