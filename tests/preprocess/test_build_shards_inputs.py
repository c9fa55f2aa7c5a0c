"""build_shards' other inputs: InsightFace RecordIO, a folder per identity (aligned, with a landmark
file, with the detector: a fake one injected here), and the landmark-file rules."""

from __future__ import annotations

import json
import sys
import tarfile
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.cli import UserError, run_cli
from preprocess import build_shards
from preprocess._marker_faces import face_image, random_landmarks, write_jpeg
from preprocess.recordio import read_rec
from shards.format import decode_label
from tests._recordio_util import write_rec


def _build(argv: list[str], capsys) -> dict:
    code = run_cli(build_shards.main, argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def _samples(out: Path) -> dict[str, dict]:
    """key -> {"jpg": bytes, "label": int, "json": dict} over every shard in OUT."""
    found: dict[str, dict] = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                value = decode_label(data) if ext == "lbl" else json.loads(data) if ext == "json" else data
                found.setdefault(key, {})["label" if ext == "lbl" else ext] = value
    return found


# ------------------------------------------------------------------------------------------ RecordIO


def test_rec_every_good_record_with_its_label_and_unchanged_jpeg(tmp_path, capsys):
    root = tmp_path / "ms1m"
    root.mkdir()
    images = write_rec(root, corrupt=5)
    summary = _build(
        [
            "rec",
            "--root",
            str(root),
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "1",
            "--max-reject-fraction",
            "0.1",
        ],
        capsys,
    )
    assert summary["samples"] == len(images) - 1 and summary["classes"] == 2
    assert summary["reject_reasons"] == {"record_corrupt": 1}
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert "offset" in rejects[0]["detail"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dataset"] == "rec" and manifest["classes"] == ["0", "1"]
    packed = _samples(tmp_path / "out")
    by_record = {int(v["json"]["source"].split("/")[1]): v for v in packed.values()}
    assert set(by_record) == set(images) - {5}
    for index, sample in by_record.items():
        label, jpeg = images[index]
        assert sample["jpg"] == jpeg and sample["label"] == label  # bytes passed through, no re-encode


def test_rec_other_image_size_reencodes(tmp_path, capsys):
    root = tmp_path / "r"
    root.mkdir()
    write_rec(root, per_class=(3, 2))
    _build(
        [
            "rec",
            "--root",
            str(root),
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "1",
            "--image-size",
            "112x96",
        ],
        capsys,
    )
    for sample in _samples(tmp_path / "o").values():
        image = cv2.imdecode(np.frombuffer(sample["jpg"], np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (112, 96, 3)


def test_rec_truncated_file_and_missing_files(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    write_rec(root, per_class=(4, 4))
    data = (root / "train.rec").read_bytes()
    (root / "train.rec").write_bytes(data[: len(data) * 2 // 3])
    inputs = read_rec(root)
    reasons = [e.reason for e in inputs.entries]
    assert "record_truncated" in reasons and reasons.count(None) >= 3
    (root / "property").unlink()
    with pytest.raises(UserError, match="property"):
        read_rec(root)
    (root / "property").write_text("2,112,112\n")
    (root / "train.idx").unlink()
    with pytest.raises(UserError, match=r"train\.idx"):
        read_rec(root)


# ------------------------------------------------------------------------------------------- folders


def _folders(root: Path) -> dict[str, np.ndarray]:
    """Two identities (one with a space in its name, one PNG), an empty folder, a text file."""
    rng = np.random.default_rng(3)
    truth = {}
    for rel in ["Ann Lee/a 1.jpg", "Ann Lee/a2.jpg", "Bob/b1.png", "Bob/b2.jpg"]:
        pts = random_landmarks(160, 180, rng, (45.0, 60.0), max_angle=10.0)
        image = face_image(160, 180, pts, rng)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".png"):
            cv2.imwrite(str(path), image)
        else:
            write_jpeg(path, image)
        truth[rel] = pts
    (root / "Empty").mkdir()
    (root / "Bob" / "notes.txt").write_text("not an image")
    return truth


def test_folders_with_a_landmark_file(tmp_path, capsys):
    root = tmp_path / "photos"
    truth = _folders(root)
    lines = [rel + "\t" + " ".join(f"{v:.2f}" for v in pts.reshape(-1)) for rel, pts in truth.items()]
    (tmp_path / "lm.txt").write_text("\n".join(lines) + "\n")
    summary = _build(
        [
            "folders",
            "--root",
            str(root),
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "1",
            "--landmarks",
            str(tmp_path / "lm.txt"),
        ],
        capsys,
    )
    assert summary["samples"] == 4 and summary["classes"] == 2 and summary["rejects"] == 0
    packed = _samples(tmp_path / "o")
    assert "Ann~20Lee__a~201" in packed and {v["json"]["source"] for v in packed.values()} == set(truth)
    for sample in packed.values():
        assert cv2.imdecode(np.frombuffer(sample["jpg"], np.uint8), cv2.IMREAD_COLOR).shape == (112, 112, 3)
    index = (tmp_path / "o" / "folders-000000.idx").read_text()
    assert index.isascii() and all(len(line.split()) == 12 for line in index.splitlines()[1:])


def test_folders_aligned_pass_jpegs_through(tmp_path, capsys):
    root = tmp_path / "crops"
    rng = np.random.default_rng(5)
    written = {}
    for rel in ["A/1.jpg", "A/2.jpg", "B b/1.png"]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = face_image(112, 112, random_landmarks(112, 112, rng, (30.0, 35.0)), rng)
        if rel.endswith(".png"):
            cv2.imwrite(str(path), image)
        else:
            write_jpeg(path, image)
        written[rel] = path.read_bytes()
    summary = _build(
        ["folders", "--root", str(root), "--out", str(tmp_path / "o"), "--workers", "1", "--aligned"], capsys
    )
    assert summary["samples"] == 3
    for sample in _samples(tmp_path / "o").values():
        source = sample["json"]["source"]
        if source.endswith(".jpg"):
            assert sample["jpg"] == written[source]
        else:  # the PNG becomes a JPEG of the same crop
            assert sample["jpg"][:2] == b"\xff\xd8"


def test_folders_needs_exactly_one_way_to_the_face(tmp_path, capsys):
    root = tmp_path / "p"
    _folders(root)
    for extra in ([], ["--aligned", "--detect"]):
        assert (
            run_cli(build_shards.main, ["folders", "--root", str(root), "--out", str(tmp_path / "o"), *extra])
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "exactly one of --aligned" in err


def _fake_detector(monkeypatch, faces_for):
    """preprocess.detect replaced by a module whose detect_faces answers from `faces_for(image)`."""
    module = types.ModuleType("preprocess.detect")
    module.detect_faces = faces_for  # which face is used stays preprocess/face_choice.py's rule
    monkeypatch.setitem(sys.modules, "preprocess.detect", module)
    import preprocess

    monkeypatch.setattr(preprocess, "detect", module, raising=False)


def test_folders_detect_wiring(tmp_path, capsys, monkeypatch):
    root = tmp_path / "p"
    truth = _folders(root)
    seen = []

    pts = next(iter(truth.values()))  # any plausible face geometry: the wiring is what is tested

    def faces_for(image_rgb):
        seen.append(image_rgb.shape)
        if len(seen) == 1:
            return []  # the first photo: no face
        face = types.SimpleNamespace(box=(10.0, 10.0, 100.0, 120.0), score=0.98, landmarks=pts)
        small = types.SimpleNamespace(box=(0.0, 0.0, 20.0, 20.0), score=0.9, landmarks=pts * 0.2)
        return [small, face]

    _fake_detector(monkeypatch, faces_for)
    summary = _build(
        [
            "folders",
            "--root",
            str(root),
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "1",
            "--detect",
            "--max-reject-fraction",
            "0.5",
        ],
        capsys,
    )
    assert summary["samples"] == 3 and summary["reject_reasons"] == {"no_face": 1}
    for sample in _samples(tmp_path / "o").values():
        record = sample["json"]
        assert record["detector_score"] == 0.98 and record["detector_box"] == [10.0, 10.0, 100.0, 120.0]
        assert record["faces_found"] == 2 and len(record["landmarks"]) == 5
    seen.clear()
    summary = _build(
        [
            "folders",
            "--root",
            str(root),
            "--out",
            str(tmp_path / "o2"),
            "--workers",
            "1",
            "--detect",
            "--single-face-only",
            "--max-reject-fraction",
            "1",
        ],
        capsys,
    )
    assert summary["reject_reasons"] == {"no_face": 1, "multiple_faces": 3}
    assert seen[0] == (180, 160, 3)  # the detector gets the whole photo


def test_detect_without_the_detector_is_one_line(tmp_path, capsys, monkeypatch):
    root = tmp_path / "p"
    _folders(root)
    monkeypatch.setitem(sys.modules, "preprocess.detect", None)  # makes the import fail
    monkeypatch.delattr("preprocess.detect", raising=False)  # also once another test imported it
    assert (
        run_cli(build_shards.main, ["folders", "--root", str(root), "--out", str(tmp_path / "o"), "--detect"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "preprocess/detect.py" in err


# ------------------------------------------------------------------------------------ landmark files


def test_landmark_rows_of_eleven_numbers_and_conflicting_duplicates(tmp_path, capsys):
    root = tmp_path / "p"
    truth = _folders(root)
    rows = [rel + "\t" + " ".join(f"{v:.2f}" for v in pts.reshape(-1)) for rel, pts in truth.items()]
    (tmp_path / "eleven.txt").write_text("\n".join([rows[0] + " 7.0", *rows[1:]]) + "\n")
    summary = _build(
        [
            "folders",
            "--root",
            str(root),
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "1",
            "--landmarks",
            str(tmp_path / "eleven.txt"),
            "--max-reject-fraction",
            "0.5",
        ],
        capsys,
    )
    assert summary["reject_reasons"] == {"landmarks_long": 1}
    (tmp_path / "same.txt").write_text("\n".join([*rows, rows[0]]) + "\n")  # a repeated, equal row is fine
    _build(
        [
            "folders",
            "--root",
            str(root),
            "--out",
            str(tmp_path / "o2"),
            "--workers",
            "1",
            "--landmarks",
            str(tmp_path / "same.txt"),
        ],
        capsys,
    )
    other = rows[0].rsplit(" ", 1)[0] + " 1.0"
    (tmp_path / "conflict.txt").write_text("\n".join([*rows, other]) + "\n")
    argv = [
        "folders",
        "--root",
        str(root),
        "--out",
        str(tmp_path / "o3"),
        "--landmarks",
        str(tmp_path / "conflict.txt"),
    ]
    assert run_cli(build_shards.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "conflict.txt:5" in err and "different landmark row" in err


def test_lfw_detect_needs_no_landmark_file(tmp_path, capsys, monkeypatch):
    from preprocess._marker_faces import write_lfw

    truth = write_lfw(tmp_path / "lfw", identities=3, per_identity=2)
    (tmp_path / "lfw" / "lfw_landmark_150.txt").unlink()

    def faces_for(image_rgb):  # the marker faces' own points, found by their colours
        from preprocess._marker_faces import marker_centres

        pts = marker_centres(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
        return [types.SimpleNamespace(box=(0.0, 0.0, 150.0, 150.0), score=0.9, landmarks=pts)]

    _fake_detector(monkeypatch, faces_for)
    out = tmp_path / "o"
    summary = _build(
        ["lfw", "--root", str(tmp_path / "lfw"), "--out", str(out), "--workers", "1", "--detect"], capsys
    )
    assert summary["samples"] == len(truth) and summary["rejects"] == 0 and summary["pairs"] > 0
    for sample in _samples(out).values():
        found = np.asarray(sample["json"]["landmarks"])
        np.testing.assert_allclose(found, truth[sample["json"]["source"]], atol=1.5)
