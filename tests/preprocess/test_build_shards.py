"""build_shards on small marker-face datasets in the real layouts: contents, determinism, bad input,
existing output, interrupt-and-resume, and read-back through webdataset and a DALI CPU pipeline."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.cli import run_cli
from preprocess import align
from preprocess._marker_faces import marker_centres, write_lfw, write_vggface2
from preprocess.build_shards import main
from shards.format import decode_label, sample_key
from shards.manifest import load_manifest

REPO = Path(__file__).resolve().parents[2]


def build(args: list[str], capsys) -> tuple[int, dict | None, str]:
    code = run_cli(main, args)
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), captured.err


def _error_line(err: str) -> str:
    """The one error line; logs before it are fine, a traceback is not."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def read_tar(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in tar order."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def vgg_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("vggface2")
    truth = write_vggface2(root, identities=5, per_identity=8, size=(180, 230), eye_px=(30, 60))
    return root, truth


def test_vggface2_build_contents(vgg_root, tmp_path, capsys):
    root, truth = vgg_root
    out = tmp_path / "shards"
    code, summary, err = build(
        ["vggface2", "--root", str(root), "--out", str(out), "--samples-per-shard", "16", "--workers", "2"],
        capsys,
    )
    assert code == 0, err
    assert summary["samples"] == 40 and summary["rejects"] == 0 and summary["shards"] == 3
    manifest = load_manifest(out, verify="sha256")
    assert manifest.classes == [f"n{i:06d}" for i in range(1, 6)]
    assert manifest.dataset == "vggface2" and manifest.split == "train" and manifest.image_size == (112, 112)
    assert [s.samples for s in manifest.shards] == [16, 16, 8]
    assert [s.file for s in manifest.shards] == [f"vggface2-train-00000{i}.tar" for i in range(3)]
    raw = manifest.raw
    assert raw["num_inputs"] == 40 and raw["num_rejects"] == 0 and raw["jpeg_quality"] == 95
    np.testing.assert_allclose(raw["template"], align.template())
    assert "pairs" not in raw and raw["command"].startswith("python preprocess/build_shards.py vggface2")
    assert (out / "rejects.jsonl").read_text() == ""
    assert not (out / ".build").exists()
    seen = []
    for shard in manifest.shard_paths():
        samples = read_tar(shard)
        assert len({json.loads(s["json"])["identity"] for _, s in samples}) > 1  # shuffled across shards
        for key, members in samples:
            assert list(members) == ["jpg", "lbl", "json"]
            record = json.loads(members["json"])
            assert key == sample_key(record["source"])
            assert (
                decode_label(members["lbl"]) == record["label"] == manifest.classes.index(record["identity"])
            )
            np.testing.assert_allclose(record["landmarks"], truth[record["source"]], atol=1e-3)
            crop = cv2.imdecode(np.frombuffer(members["jpg"], np.uint8), cv2.IMREAD_COLOR)
            np.testing.assert_array_less(np.abs(marker_centres(crop) - align.template()), 1.0)
            seen.append(record["source"])
    assert sorted(seen) == sorted(truth)


def test_same_inputs_give_identical_bytes_and_options_are_honoured(vgg_root, tmp_path, capsys):
    root, _ = vgg_root
    args = [
        "vggface2",
        "--root",
        str(root),
        "--samples-per-shard",
        "7",
        "--image-size",
        "128",
        "--jpeg-quality",
        "80",
    ]
    assert build([*args, "--out", str(tmp_path / "a"), "--workers", "1"], capsys)[0] == 0
    assert build([*args, "--out", str(tmp_path / "b"), "--workers", "2"], capsys)[0] == 0
    a, b = load_manifest(tmp_path / "a", "sha256"), load_manifest(tmp_path / "b", "sha256")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    for pa, pb in zip(a.index_paths(), b.index_paths()):
        assert pa.read_bytes() == pb.read_bytes()
    assert a.image_size == (128, 128) and a.raw["jpeg_quality"] == 80
    key, members = read_tar(a.shard_paths()[0])[0]
    assert cv2.imdecode(np.frombuffer(members["jpg"], np.uint8), cv2.IMREAD_COLOR).shape == (128, 128, 3)
    # A different seed deals the samples differently.
    assert build([*args, "--out", str(tmp_path / "c"), "--seed", "1"], capsys)[0] == 0
    assert load_manifest(tmp_path / "c").shards[0].sha256 != a.shards[0].sha256
    # Subsets.
    code, summary, _ = build(
        [*args, "--out", str(tmp_path / "d"), "--identities", "2", "--limit", "10"], capsys
    )
    assert code == 0 and summary["samples"] == 10 and summary["classes"] == 2


BAD_CASES = {
    # relative path -> expected reason; built by `bad_root`
    "n000001/0001_01.jpg": "jpeg_truncated",
    "n000001/0002_01.jpg": "image_unreadable",  # not an image at all
    "n000001/0003_01.jpg": "jpeg_corrupt",  # JPEG start, broken header
    "n000001/0004_01.jpg": "image_missing",  # listed, deleted from disk
    "n000002/0001_01.jpg": "landmarks_missing",
    "n000002/0002_01.jpg": "landmarks_short",
    "n000002/0003_01.jpg": "landmarks_not_numeric",
    "n000002/0004_01.jpg": "landmarks_nan",
    "n000003/0001_01.jpg": "landmarks_outside_image",
    "n000003/0002_01.jpg": "landmarks_collinear",
    "n000003/0003_01.jpg": "landmarks_reflected",
}


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    write_vggface2(root, identities=3, per_identity=8, size=(160, 200), eye_px=(30, 50), seed=5)
    img = root / "train"
    good = (img / "n000003/0008_01.jpg").read_bytes()
    (img / "n000001/0001_01.jpg").write_bytes(good[: len(good) // 2])
    (img / "n000001/0002_01.jpg").write_bytes(b"this is not an image" * 50)
    (img / "n000001/0003_01.jpg").write_bytes(b"\xff\xd8\xff\xdb\x00\x01" + good[6:])
    (img / "n000001/0004_01.jpg").unlink()
    csv = root / "bb_landmark/loose_landmark_train.csv"
    lines = csv.read_text().splitlines()
    edited = []
    for line in lines:
        name = line.split(",", 1)[0].strip('"')
        fields = line.split(",")
        rel = name + ".jpg"
        if rel == "n000002/0001_01.jpg":
            continue
        if rel == "n000002/0002_01.jpg":
            fields = fields[:7]
        elif rel == "n000002/0003_01.jpg":
            fields[4] = "abc"
        elif rel == "n000002/0004_01.jpg":
            fields[2] = "nan"
        elif rel == "n000003/0001_01.jpg":
            fields[1] = "900.0"
        elif rel == "n000003/0002_01.jpg":
            fields[1:] = [f"{20 + 10 * k:.1f},{30 + 5 * k:.1f}" for k in range(5)]
        elif rel == "n000003/0003_01.jpg":  # left and right swapped (eyes and mouth corners)
            f = fields[1:]
            fields[1:] = f[2:4] + f[0:2] + f[4:6] + f[8:10] + f[6:8]
        edited.append(",".join(fields))
    csv.write_text("\n".join(edited) + "\n")
    return root


def test_every_bad_input_is_rejected_with_its_reason(bad_root, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["vggface2", "--root", str(bad_root), "--out", str(out), "--samples-per-shard", "5"]
    code, summary, err = build([*args, "--max-reject-fraction", "0.5"], capsys)
    assert code == 0, err
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["path"]: r["reason"] for r in rejects} == BAD_CASES
    assert summary["rejects"] == len(BAD_CASES) and summary["samples"] == 24 - len(BAD_CASES)
    manifest = load_manifest(out)
    assert manifest.raw["num_rejects"] == len(BAD_CASES) and manifest.raw["num_inputs"] == 24
    keys = {k for p in manifest.shard_paths() for k, _ in read_tar(p)}
    assert not keys & {sample_key(p) for p in BAD_CASES}
    # With the default limit (1%) the same input fails with one line naming the rejects file.
    strict = ["vggface2", "--root", str(bad_root), "--out", str(tmp_path / "strict")]
    code, _, err = build(strict, capsys)
    assert code == 2 and _error_line(err).startswith(f"error: {tmp_path / 'strict' / 'rejects.jsonl'}: ")
    assert "--max-reject-fraction" in _error_line(err)
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_user_errors_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "bb_landmark").mkdir()
    (empty / "bb_landmark/loose_landmark_train.csv").write_text("NAME_ID,P1X\n")
    cases = [
        (["vggface2", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "--root"),
        (["vggface2", "--root", str(empty), "--out", str(tmp_path / "o")], "no usable images"),
        (["vggface2", "--root", str(empty), "--split", "val", "--out", str(tmp_path / "o")], "--images"),
        (["lfw", "--root", str(empty), "--out", str(tmp_path / "o")], "--images"),
        (["vggface2", "--root", str(empty), "--out", str(tmp_path / "o"), "--workers", "0"], "--workers"),
    ]
    for args, needle in cases:
        code, _, err = build(args, capsys)
        assert code == 2 and needle in _error_line(err), (args, err)


def test_complete_output_is_left_alone_unless_overwrite(vgg_root, tmp_path, capsys):
    root, _ = vgg_root
    out = tmp_path / "o"
    args = ["vggface2", "--root", str(root), "--out", str(out), "--samples-per-shard", "20"]
    assert build(args, capsys)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, summary, err = build([*args, "--seed", "3"], capsys)
    assert code == 0 and summary is None and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    code, summary, _ = build([*args, "--seed", "3", "--overwrite", "--samples-per-shard", "40"], capsys)
    assert code == 0 and summary["shards"] == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "rejects.jsonl",
        "vggface2-train-000000.idx",
        "vggface2-train-000000.tar",
    ]


def test_lfw_pairs_by_key(tmp_path, capsys):
    root = tmp_path / "lfw_root"
    write_lfw(root)
    (root / "lfw/Person_A/Person_A_0003.jpg").unlink()  # in the landmark file, not on disk
    out = tmp_path / "out"
    code, summary, err = build(
        ["lfw", "--root", str(root), "--out", str(out), "--max-reject-fraction", "0.1"], capsys
    )
    assert code == 0, err
    manifest = load_manifest(out)
    assert manifest.dataset == "lfw" and manifest.num_samples == 17 and manifest.raw["num_rejects"] == 1
    assert len(manifest.pairs) == 12 and summary["pairs_unresolved"] == 0
    assert [p.fold for p in manifest.pairs] == [0] * 6 + [1] * 6
    assert manifest.pairs[0].a == "Person_A__Person_A_0001" and manifest.pairs[0].same
    assert sum(p.same for p in manifest.pairs) == 6
    keys = {k for p in manifest.shard_paths() for k, _ in read_tar(p)}
    assert all(p.a in keys and p.b in keys for p in manifest.pairs)


def _cli(out: Path, root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "preprocess/build_shards.py"),
        "vggface2",
        "--root",
        str(root),
        "--out",
        str(out),
        "--samples-per-shard",
        "4",
        "--workers",
        "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def resume_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    # Large images so that one shard takes long enough to kill the build in the middle of the run.
    write_vggface2(root, identities=6, per_identity=10, size=(900, 1000), eye_px=(25, 40), seed=9)
    return root


def _snapshot(out: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != "manifest.json"
    }


def test_sigkill_then_resume_is_byte_identical(resume_root, tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_cli(clean, resume_root), check=True, capture_output=True)
    for _attempt in range(5):  # a loaded machine may starve the poller past the end of the run: retry
        shutil.rmtree(killed, ignore_errors=True)
        proc = subprocess.Popen(_cli(killed, resume_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        # Kill once some, not all, shards are complete (a .tmp shard is being written at that moment).
        while time.monotonic() < deadline and len(list(killed.glob("*.tar"))) < 3:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        finished = sorted(p.name for p in killed.glob("*.tar"))
        if not (killed / "manifest.json").exists():
            break
    assert 3 <= len(finished) < 15 and not (killed / "manifest.json").exists()
    result = subprocess.run(_cli(killed, resume_root), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # A shard renamed into place just before the kill, but not yet recorded, is rebuilt.
    resumed = int(result.stderr.split("resuming: ", 1)[1].split()[0])
    assert len(finished) - 1 <= resumed <= len(finished)
    assert _snapshot(killed) == _snapshot(clean)
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (clean, killed))
    assert {k: v for k, v in a.items() if k != "command"} == {k: v for k, v in b.items() if k != "command"}
    assert not list(killed.glob("*.tmp")) and not (killed / ".build").exists()


def test_ctrl_c_then_resume(resume_root, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen(_cli(out, resume_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(out.glob("*.tar")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert not list(out.glob("*.tmp"))
    # Different options than the unfinished build: refused with one line, nothing mixed.
    result = subprocess.run(_cli(out, resume_root, "--seed", "4"), capture_output=True, text=True)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    result = subprocess.run(_cli(out, resume_root), capture_output=True, text=True)
    assert result.returncode == 0 and load_manifest(out, "sha256").num_samples == 60


def test_read_back_through_webdataset_and_dali(vgg_root, tmp_path, capsys):
    root, _ = vgg_root
    out = tmp_path / "o"
    assert (
        build(["vggface2", "--root", str(root), "--out", str(out), "--samples-per-shard", "16"], capsys)[0]
        == 0
    )
    manifest = load_manifest(out)
    import webdataset as wds

    expected = {}
    for sample in wds.WebDataset([str(p) for p in manifest.shard_paths()], shardshuffle=False):
        record = json.loads(sample["json"])
        label = int(np.frombuffer(sample["lbl"], dtype="<i4")[0])
        assert label == manifest.classes.index(record["identity"])
        rgb = cv2.cvtColor(
            cv2.imdecode(np.frombuffer(sample["jpg"], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
        )
        expected[sample["__key__"]] = (rgb, label)
    assert len(expected) == 40

    dali = pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed")
    from nvidia.dali import fn, types

    @dali.pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def pipe():
        jpg, lbl, meta = fn.readers.webdataset(
            paths=[str(p) for p in manifest.shard_paths()],
            index_paths=[str(p) for p in manifest.index_paths()],
            ext=["jpg", "lbl", "json"],
            dtypes=[types.UINT8, types.INT32, types.UINT8],
            random_shuffle=False,
        )
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), lbl, meta

    p = pipe()
    p.build()
    got = 0
    for _ in range(5):
        images, labels, metas = p.run()
        for i in range(len(images)):
            record = json.loads(bytes(np.asarray(metas.at(i))).decode())
            rgb, label = expected[sample_key(record["source"])]
            assert int(np.asarray(labels.at(i)).reshape(-1)[0]) == label
            # Two JPEG decoders may differ by a rounding step; the pictures must be the same.
            assert np.abs(np.asarray(images.at(i)).astype(int) - rgb.astype(int)).mean() < 1.5
            got += 1
    assert got == 40


def test_shards_are_plain_tars_with_fixed_metadata(vgg_root, tmp_path, capsys):
    root, _ = vgg_root
    out = tmp_path / "o"
    assert build(["vggface2", "--root", str(root), "--out", str(out), "--limit", "3"], capsys)[0] == 0
    with tarfile.open(load_manifest(out).shard_paths()[0]) as tar:
        for member in tar:
            assert (member.mtime, member.uid, member.gid, member.mode) == (0, 0, 0, 0o644)


def test_vggface2_boxes_and_names_are_carried_when_they_ship(tmp_path, capsys):
    root = tmp_path / "vggface2"
    truth = write_vggface2(root, identities=2, per_identity=3, size=(180, 230), eye_px=(30, 60))
    sources = sorted(truth)
    (root / "meta").mkdir()
    (root / "meta" / "identity_meta.csv").write_text(
        'Class_ID, Name, Sample_Num, Flag, Gender\nn000001, "Ada_Lovelace", 3, 1, f\n'
    )
    boxes = ["NAME_ID,X,Y,W,H"] + [f"{s[:-4]},10,20,{100 + i},120" for i, s in enumerate(sources)]
    boxes[-1] = f"{sources[-1][:-4]},oops,20,30,40"  # a bad box row is left out, not a reject
    (root / "bb_landmark" / "loose_bb_train.csv").write_text("\n".join(boxes) + "\n")
    out = tmp_path / "shards"
    code, summary, err = build(["vggface2", "--root", str(root), "--out", str(out)], capsys)
    assert code == 0 and summary["samples"] == 6 and summary["rejects"] == 0, err
    parsed = [json.loads(m["json"]) for _, m in read_tar(out / "vggface2-train-000000.tar")]
    records = {r["source"]: r for r in parsed}
    for i, source in enumerate(sources):
        record = records[source]
        assert record.get("name") == ("Ada_Lovelace" if record["identity"] == "n000001" else None)
        assert record.get("bbox") == (None if i == len(sources) - 1 else [10.0, 20.0, 100.0 + i, 120.0])
