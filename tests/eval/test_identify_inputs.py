"""eval/identify.py's inputs that are not what it expects: detected faces whose landmarks cannot be
aligned, gallery files that are not ours, a camera that is not there."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from common.cli import UserError, run_cli
from eval.identification import faces
from eval.identification.faces import load_face_model
from eval.identification.gallery import Gallery, load_gallery, normalize, person_templates, save_gallery
from eval.identify import main as identify_main
from models.backbones import build_backbone
from models.model_file import save_embedding_checkpoint
from preprocess.align import template
from preprocess.detect import Face

ROOT = Path(__file__).resolve().parents[2]


def test_a_detected_face_with_degenerate_landmarks_is_left_out_with_a_warning(monkeypatch, capsys) -> None:
    good = template() + 40.0
    detected = [
        Face(box=(40.0, 40.0, 112.0, 112.0), score=0.99, landmarks=good),
        Face(box=(10.0, 10.0, 30.0, 30.0), score=0.98, landmarks=np.full((5, 2), 20.0)),
        Face(box=(150.0, 10.0, 80.0, 80.0), score=0.97, landmarks=good + [150.0, 0.0]),  # past the edge
    ]
    monkeypatch.setattr(faces, "detect_faces", lambda rgb, **kw: detected)
    found = faces.find_faces(np.zeros((200, 240, 3), np.uint8), (112, 112), "photo.jpg")
    assert [f.face for f in found] == detected[:1] and found[0].crop.shape == (112, 112, 3)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: photo.jpg: the face at x,y,w,h ") for line in err)
    assert "landmarks_degenerate" in err[0] and "10,10,30,30" in err[0]
    assert "landmarks_outside_image (points outside the 240x200 image)" in err[1]


@pytest.fixture(scope="module")
def model_and_gallery(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny checkpoint and a two-person gallery saved for it (no photos needed)."""
    tmp = tmp_path_factory.mktemp("gallery")
    torch.manual_seed(0)
    spec = {"backbone": "tiny", "embedding_size": 16, "image_size": [112, 112]}
    save_embedding_checkpoint(tmp / "m.pt", spec, build_backbone("tiny", 16, (112, 112)).state_dict())
    info = load_face_model(tmp / "m.pt").info
    emb = normalize(np.random.default_rng(0).normal(size=(3, 16)))
    person = np.array([0, 0, 1])
    paths = ["a/1.jpg", "a/2.jpg", "b.jpg"]
    gallery = Gallery(["ana", "bo"], person_templates(emb, person, 2), emb, person, paths, str(tmp), info)
    return tmp / "m.pt", save_gallery(tmp / "g.npz", gallery)


def _saved(**arrays: np.ndarray) -> bytes:
    """An .npz of `arrays`, or the .npy of the one array named `array`."""
    buf = io.BytesIO()
    if "array" in arrays:
        np.save(buf, arrays["array"])
    else:
        np.savez(buf, **arrays)
    return buf.getvalue()


def _gallery_cases(good: Path) -> list[tuple[str, bytes, str]]:
    """(file name, its bytes, what the one error line must say is wrong)."""
    data = good.read_bytes()
    with np.load(good) as z:
        ours = {k: z[k] for k in z.files}
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("notes.txt", "a shopping list")
    inconsistent = "inconsistent gallery arrays: "
    return [
        (
            "random.npz",
            np.random.default_rng(0).bytes(4096),
            "not a NumPy .npz archive; a gallery is the .npz",
        ),
        (
            "pickle.npz",
            pickle.dumps({"names": ["x"]}),
            "a Python pickle (not read: loading it could run code)",
        ),
        ("array.npy", _saved(array=np.zeros(3)), "a single NumPy array (.npy)"),
        ("other.zip", zipped.getvalue(), "not a facetrain-gallery file (missing format, version, names"),
        (
            "truncated.npz",
            data[: len(data) // 2],
            "the archive cannot be read, damaged or truncated? (BadZipFile",
        ),
        (
            "newer.npz",
            _saved(**ours | {"version": np.array(2)}),
            "version 2, this facetrain reads 1 (a newer",
        ),
        ("version.npz", _saved(**ours | {"version": np.array("1.0")}), "version '1.0' is not a whole number"),
        (
            "objects.npz",
            _saved(**ours | {"names": np.array(["a", "b"], object)}),
            "'names' holds Python objects",
        ),
        (
            "texts.npz",
            _saved(**ours | {"templates": np.full((2, 16), "x")}),
            "'templates' is a 2-d <U1 array",
        ),
        (
            "floats.npz",
            _saved(**ours | {"photo_person": np.zeros(3)}),
            "is a 1-d float64 array, a gallery's is 1-d whole",
        ),
        (
            "short.npz",
            _saved(**ours | {"photo_paths": np.array(["a.jpg"])}),
            f"{inconsistent}3 embeddings for 1 photo",
        ),
        (
            "lonely.npz",
            _saved(**ours | {"photo_person": np.zeros(3, int)}),
            f"{inconsistent}a person without photos",
        ),
        (
            "range.npz",
            _saved(**ours | {"photo_person": np.array([0, 1, 7])}),
            f"{inconsistent}photo_person outside 0..1",
        ),
        (
            "size.npz",
            _saved(**ours | {"image_size": np.array([112, 112, 3])}),
            f"{inconsistent}image_size is not (H, W)",
        ),
    ]


def test_a_gallery_file_that_is_not_ours_is_one_line_saying_what_is_wrong(
    model_and_gallery, tmp_path, capsys
) -> None:
    model, good = model_and_gallery
    assert load_gallery(good).names == ["ana", "bo"]
    for name, content, message in _gallery_cases(good):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(UserError) as caught:
            load_gallery(path)
        assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value), name
    path = tmp_path / "random.npz"  # and through the command, as one line
    code = run_cli(identify_main, ["search", "--gallery", str(path), "--model", str(model), str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert (
        code == 2
        and err
        == f"error: {path}: not a NumPy .npz archive; a gallery is the .npz that identify.py enrol writes"
    )


@pytest.mark.parametrize(
    ("camera", "message"),
    [("-1", "--camera: expected a camera number 0, 1, ..., got -1"), ("999", "--camera 999: no camera 999 ")],
)
def test_a_camera_that_is_not_there_is_one_line_not_a_crash(model_and_gallery, camera, message) -> None:
    """In a subprocess: OpenCV's VideoCapture(-1) with no camera was a segmentation fault (rc -11)."""
    model, gallery = model_and_gallery
    argv = [
        "search",
        "--gallery",
        str(gallery),
        "--model",
        str(model),
        "--camera",
        camera,
        "--max-frames",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "eval" / "identify.py"), *argv]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1 and message in err, (done.returncode, err)
