"""eval/identify.py enrol|search on generated faces, eval/identification/gallery.py's search and figures,
and (slow) identification on real LFW with the reference model."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.cli import run_cli
from eval.identification import faces as faces_module
from eval.identification.faces import embed_crops, find_faces, load_face_model, read_rgb
from eval.identification.gallery import (
    TemplateIndex,
    faiss_available,
    load_gallery,
    normalize,
    open_set_rate,
    rank_k_accuracy,
)
from eval.identification.matcher import Matcher, label_photos
from eval.identify import main
from models.backbones import build_backbone
from models.model_file import save_embedding_checkpoint
from preprocess.detect import detect_faces
from tests._long import long_real_lfw
from tests._real_lfw import LFW, REFERENCE


def _model(path: Path, image_size: tuple[int, int] = (112, 112), seed: int = 0, **extra) -> Path:
    torch.manual_seed(seed)
    net = build_backbone("tiny", 64, image_size)
    spec = {"backbone": "tiny", "embedding_size": 64, "image_size": list(image_size)}
    save_embedding_checkpoint(path, spec, net.state_dict(), **extra)
    return path


def _detected_photos(identity: int, wanted: int) -> list[bytes]:
    """JPEGs of one generated identity in which the detector finds exactly one face (fixed seeds)."""
    from preprocess._procedural_faces import Photographer, make_identity

    ph, ident, out = Photographer(0), make_identity(np.random.default_rng([0, 2, identity])), []
    for j in range(40):
        jpg, _, _ = ph.photo(
            ident,
            np.random.default_rng([0, 3, identity, j]),
            (200, 200),
            eye_px=40,
            angle_sd=3.0,
            shift_sd=(3, 3),
            centre_frac=(0.5, 0.48),
        )
        rgb = np.ascontiguousarray(cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1])
        if len(detect_faces(rgb)) == 1:
            out.append(jpg)
            if len(out) == wanted:
                return out
    raise AssertionError(f"identity {identity}: only {len(out)} detectable photos among 40")


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Photos of two generated people, 'ana' (3) and 'bo' (2), each with one detectable face."""
    root = tmp_path_factory.mktemp("people")
    photos = {}
    for name, identity, count in (("ana", 0, 3), ("bo", 1, 2)):
        photos[name] = []
        for k, jpg in enumerate(_detected_photos(identity, count)):
            path = root / f"{name}_{k}.jpg"
            path.write_bytes(jpg)
            photos[name].append(path)
    return photos


@pytest.fixture(scope="module")
def enrolled(people: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A gallery folder (ana as a person folder, bo as flat files, plus bad photos) and its GALLERY.npz."""
    tmp = tmp_path_factory.mktemp("enrolled")
    gallery = tmp / "gallery"
    (gallery / "ana").mkdir(parents=True)
    for k, path in enumerate(people["ana"][:2]):
        (gallery / "ana" / f"{k}.jpg").write_bytes(path.read_bytes())
    (gallery / "ana" / "broken.jpg").write_bytes(b"not a jpeg")
    (gallery / "bo_1.jpg").write_bytes(people["bo"][0].read_bytes())
    cv2.imwrite(str(gallery / "wall.png"), np.full((120, 120, 3), 200, np.uint8))  # no face
    (gallery / "notes.txt").write_text("not a photo")
    model = _model(tmp / "model.pt")
    out = tmp / "GALLERY.npz"
    argv = ["enrol", "--gallery", str(gallery), "--model", str(model), "--out", str(out), "--workers", "0"]
    assert main(argv) == 0
    return {"gallery": gallery, "model": model, "npz": out, "tmp": tmp}


def test_enrol_lists_bad_photos_and_stores_templates(enrolled: dict[str, Path], capsys) -> None:
    g = load_gallery(enrolled["npz"])
    assert g.names == ["ana", "bo"]  # folder person and flat-file person ("bo_1" -> "bo")
    assert g.photo_paths == ["ana/0.jpg", "ana/1.jpg", "bo_1.jpg"] and g.photo_person.tolist() == [0, 0, 1]
    assert dict(g.skipped) == {"ana/broken.jpg": "unreadable image", "wall.png": "no face found"}
    assert g.model.architecture == "tiny/64" and g.model.image_size == (112, 112)
    assert len(g.model.fingerprint) == 64
    assert np.allclose(np.linalg.norm(g.templates, axis=1), 1, atol=1e-5)
    assert np.allclose(g.templates[0], normalize(g.embeddings[:2].mean(0)), atol=1e-5)
    with np.load(enrolled["npz"], allow_pickle=False) as data:  # plain arrays only
        assert data["names"].dtype.kind == "U"


def _two_people(people: dict[str, list[Path]]) -> np.ndarray:
    """bo's photo in the centre of a wider canvas, ana's smaller in the top right corner (BGR)."""
    canvas = np.full((300, 480, 3), 128, np.uint8)
    canvas[50:250, 140:340] = cv2.imread(str(people["bo"][1]))
    small = cv2.resize(cv2.imread(str(people["ana"][0])), (140, 140), interpolation=cv2.INTER_AREA)
    canvas[0:140, 340:480] = small
    assert len(detect_faces(np.ascontiguousarray(canvas[:, :, ::-1]))) == 2
    return canvas


def test_a_photo_with_two_faces_enrols_the_central_one_unless_single_face_only(
    enrolled: dict[str, Path], people, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "gallery"
    folder.mkdir()
    cv2.imwrite(str(folder / "duo.png"), _two_people(people))
    (folder / "bo.jpg").write_bytes(people["bo"][1].read_bytes())
    (folder / "ana.jpg").write_bytes(people["ana"][0].read_bytes())
    model = str(enrolled["model"])
    argv = ["enrol", "--gallery", str(folder), "--model", model, "--workers", "0"]
    # Default: the large central face (bo), as build_shards --detect keeps; recorded in the gallery.
    assert main([*argv, "--out", str(tmp_path / "a.npz")]) == 0
    assert json.loads(capsys.readouterr().out)["face_policy"] == "largest-central"
    g = load_gallery(tmp_path / "a.npz")
    assert g.names == ["ana", "bo", "duo"]
    duo, ana, bo = (g.embeddings[g.photo_paths.index(n)] for n in ("duo.png", "ana.jpg", "bo.jpg"))
    assert float(duo @ bo) > 0.9 and float(duo @ bo) > float(duo @ ana) + 0.1
    assert g.face_policy == "largest-central" and g.skipped == []
    # --use-largest is the default's alias: the same gallery.
    assert main([*argv, "--out", str(tmp_path / "b.npz"), "--use-largest"]) == 0
    same = load_gallery(tmp_path / "b.npz")
    assert np.array_equal(same.embeddings, g.embeddings) and same.face_policy == "largest-central"
    capsys.readouterr()
    # --single-face-only: the photo is left out with its reason, and the policy is recorded.
    assert main([*argv, "--out", str(tmp_path / "c.npz"), "--single-face-only"]) == 0
    assert (
        f"warning: {folder / 'duo.png'}: 2 faces (single-face-only), not enrolled" in capsys.readouterr().err
    )
    strict = load_gallery(tmp_path / "c.npz")
    assert "duo.png" not in strict.photo_paths and strict.skipped == [
        ("duo.png", "2 faces (single-face-only)")
    ]
    assert strict.face_policy == "single-face-only"
    err = _one_line_error(
        [*argv, "--out", str(tmp_path / "d.npz"), "--use-largest", "--single-face-only"], capsys
    )
    assert "not allowed with" in err


def test_a_gallery_written_before_the_face_policy_still_loads_and_searches(
    enrolled: dict[str, Path], people, tmp_path: Path, capsys
) -> None:
    with np.load(enrolled["npz"], allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "face_policy"}
        assert str(data["face_policy"]) == "largest-central"
    old = tmp_path / "old.npz"
    np.savez(old, **arrays)
    g = load_gallery(old)
    assert g.face_policy is None and g.face_policy_text == "not recorded" and g.names == ["ana", "bo"]
    search = ["search", "--gallery", str(old), "--model", str(enrolled["model"]), "--workers", "0"]
    assert main([*search, str(people["bo"][0])]) == 0
    assert "2 people in " + str(old) + " (faces: not recorded)" in capsys.readouterr().err


def test_search_labels_photos_and_writes_every_output(
    enrolled: dict[str, Path], people, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00" * 100)
    inputs = [people["ana"][0], people["bo"][0], garbage, tmp_path / "missing.jpg", people["ana"][2]]
    out = tmp_path / "out"
    options = ["--out", str(out), "--threshold", "0.5", "--top-k", "2"]
    code = main([*_search(enrolled), *map(str, inputs), *options])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"warning: {garbage}: unreadable image, skipped" in err
    assert f"warning: {tmp_path / 'missing.jpg'}: no such file or folder, skipped" in err
    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert [r["source"] for r in records] == [str(inputs[0]), str(inputs[1]), str(inputs[4])]
    for r in records:
        assert set(r) == {"source", "frame", "box", "identity", "score", "top"} and r["frame"] is None
        assert len(r["box"]) == 4 and len(r["top"]) == 2 and r["top"][0][1] == r["score"]
    # The photos enrolled match their person closely (ana's template is the mean of two photos).
    assert records[0]["identity"] == "ana" and records[0]["score"] > 0.8
    assert records[1]["identity"] == "bo" and records[1]["score"] > 0.99  # bo's only photo: his template
    assert sorted(p.name for p in (out / "annotated").iterdir()) == ["ana_0.jpg", "ana_2.jpg", "bo_0.jpg"]
    report = (out / "report.html").read_text()
    assert report.count("<section data-source=") == 3  # one per photo read (not the garbage one)
    assert report.count("'><td><img src='data:image/jpeg;base64,") == 3  # one face row under each
    assert report.count("data:image/jpeg;base64,") == 6  # each face beside its matched gallery photo


def _per_photo(enrolled: dict[str, Path], photos: list[Path], top_k: int) -> tuple[Matcher, list[tuple]]:
    """What search found photo by photo before it batched faces across photos: (path, faces, labels)
    with each photo read, detected, embedded and searched on its own."""
    gallery, model = load_gallery(enrolled["npz"]), load_face_model(enrolled["model"])
    matcher = Matcher(gallery, model, TemplateIndex(gallery.templates), 0.5, top_k, True)
    found = []
    for path in photos:
        rgb = read_rgb(path)
        faces = None if rgb is None else find_faces(rgb, model.info.image_size)
        found.append((path, faces, matcher.label(faces or [])))
    return matcher, found


def _several_photos(people: dict[str, list[Path]], tmp_path: Path) -> list[Path]:
    duo = tmp_path / "duo.png"  # two faces in one photo
    cv2.imwrite(str(duo), np.hstack([cv2.imread(str(people["bo"][1]))] * 2))
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00" * 100)
    return [
        people["ana"][0],
        duo,
        garbage,
        people["bo"][0],
        people["ana"][1],
        people["ana"][2],
        people["bo"][1],
    ]


def test_faces_labelled_in_batches_across_photos_match_the_per_photo_path(
    enrolled: dict[str, Path], people, tmp_path: Path
) -> None:
    photos = _several_photos(people, tmp_path)
    matcher, expected = _per_photo(enrolled, photos, top_k=2)
    found = [(path, faces) for path, faces, _ in expected]
    for batch in (1, 2, 3, 100):  # a batch may end inside a photo's faces' worth or span them all
        got = list(label_photos(iter(found), matcher, batch=batch))
        assert [(p, f) for p, f, _ in got] == found
        for (_, _, labels), (_, _, want) in zip(got, expected):
            assert [lab["identity"] for lab in labels] == [w["identity"] for w in want]
            assert [[n for n, _ in lab["top"]] for lab in labels] == [[n for n, _ in w["top"]] for w in want]
            assert np.allclose([lab["score"] for lab in labels], [w["score"] for w in want], atol=1e-4)
    # The matched gallery photo: the person's enrolled photo most like the face.
    g = matcher.gallery
    for faces, labels in ((f, lab) for _, f, lab in expected if f):
        for face, label in zip(faces, labels):
            q = embed_crops(matcher.model.embed, [face.crop])[0]
            mine = np.flatnonzero(g.photo_person == g.names.index(label["nearest"]))
            assert label["photo"] == mine[np.argmax(g.embeddings[mine] @ q)]


def test_search_with_detection_processes_repeats_the_per_photo_path(
    enrolled: dict[str, Path], people, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two detection processes, one photo in flight each (so the queue refills as results are taken),
    every face of the folder embedded in one batch: the same records, in the same order."""
    monkeypatch.setattr(faces_module, "IN_FLIGHT_PER_WORKER", 1)
    photos = _several_photos(people, tmp_path)
    _, expected = _per_photo(enrolled, photos, top_k=2)
    out = tmp_path / "out"
    argv = [*_search(enrolled)[:-2], "--workers", "2", *map(str, photos), "--out", str(out)]
    assert main([*argv, "--threshold", "0.5", "--top-k", "2"]) == 0
    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    want = [(str(p), f, lab) for p, faces, labels in expected for f, lab in zip(faces or [], labels)]
    assert len(records) == len(want) == 7  # 5 photos of one face, the duo's two
    for record, (source, face, label) in zip(records, want):
        assert record["source"] == source and record["box"] == [round(float(v), 1) for v in face.face.box]
        assert record["identity"] == label["identity"] and record["top"][0][0] == label["top"][0][0]
        assert abs(record["score"] - label["score"]) <= 1e-4


def test_min_face_reaches_the_detector(enrolled: dict[str, Path], people, tmp_path: Path, capsys) -> None:
    photo = str(people["ana"][0])  # 200x200, the face box about 80x100 pixels
    assert main([*_search(enrolled), photo, "--min-face", "30"]) == 0
    assert capsys.readouterr().out.count("\t") == 2  # one face: source, identity, score
    assert main([*_search(enrolled), photo, "--min-face", "150"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and f"warning: {photo}: no face found" in captured.err


def test_search_a_generated_video_end_to_end(enrolled: dict[str, Path], people, tmp_path: Path) -> None:
    """Six frames of one generated face moving a few pixels, through an mp4 and back."""
    frame = cv2.imread(str(people["bo"][0]))
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, frame.shape[1::-1])
    for n in range(6):
        writer.write(
            cv2.warpAffine(
                frame,
                np.float32([[1, 0, n - 3], [0, 1, 0]]),
                frame.shape[1::-1],
                borderMode=cv2.BORDER_REPLICATE,
            )
        )
    writer.release()
    out = tmp_path / "out"
    assert main([*_search(enrolled), str(video), "--out", str(out), "--threshold", "0.5"]) == 0
    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(6))
    assert {r["source"] for r in records} == {str(video)} and {r["identity"] for r in records} == {"bo"}
    annotated = cv2.VideoCapture(str(out / "clip.annotated.mp4"))
    frames = 0
    while annotated.read()[0]:
        frames += 1
    assert frames == 6
    report = (out / "report.html").read_text()  # a section per frame, each linking to the annotated video
    assert report.count("frame 5 <small>1 face &middot; <a href='clip.annotated.mp4'>") == 1
    assert report.count("<a href='clip.annotated.mp4'>") == 6 and "<th>video frames</th><td>6</td>" in report


def _search(enrolled: dict[str, Path]) -> list[str]:
    return ["search", "--gallery", str(enrolled["npz"]), "--model", str(enrolled["model"]), "--workers", "0"]


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_another_model_or_a_bad_gallery_is_refused_in_one_line(
    enrolled: dict[str, Path], people, tmp_path: Path, capsys
) -> None:
    photo = str(people["ana"][0])
    base = ["search", "--gallery", str(enrolled["npz"]), photo, "--workers", "0", "--model"]
    err = _one_line_error([*base, str(_model(tmp_path / "narrow.pt", (112, 96)))], capsys)
    assert "112x112" in err and "112x96" in err and "enrol again" in err
    err = _one_line_error([*base, str(_model(tmp_path / "other.pt", seed=1))], capsys)
    assert "other weights" in err
    fake = tmp_path / "fake.npz"
    np.savez(fake, names=np.array(["x"]))
    model = str(enrolled["model"])
    err = _one_line_error(["search", "--gallery", str(fake), "--model", model, photo], capsys)
    assert str(fake) in err and "not a facetrain-gallery file" in err
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk")
    err = _one_line_error(["search", "--gallery", str(junk), "--model", model, photo], capsys)
    assert "not a NumPy .npz archive" in err


def test_empty_gallery_folder_and_missing_camera_are_one_line(
    enrolled: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty" / "someone").mkdir(parents=True)
    err = _one_line_error(
        [
            "enrol",
            "--gallery",
            str(tmp_path / "empty"),
            "--model",
            str(enrolled["model"]),
            "--out",
            str(tmp_path / "g.npz"),
        ],
        capsys,
    )
    assert "no photos" in err and not (tmp_path / "g.npz").exists()
    err = _one_line_error(
        ["search", "--gallery", str(enrolled["npz"]), "--model", str(enrolled["model"]), "--camera", "57"],
        capsys,
    )
    assert "--camera 57" in err


def test_threshold_comes_from_the_metrics_json_or_the_checkpoint(
    enrolled: dict[str, Path], people, tmp_path: Path, capsys
) -> None:
    photo = str(people["ana"][2])
    argv = [*_search(enrolled), photo]
    metrics = tmp_path / "lfw.json"
    metrics.write_text(json.dumps({"accuracy_mean": 0.99, "threshold": 0.999}))
    assert main([*argv, "--metrics", str(metrics)]) == 0
    captured = capsys.readouterr()
    assert "threshold 0.999 (" in captured.err and captured.out.split("\t")[1] == "unknown"
    assert main(argv) == 0
    assert "threshold 0.300 (the default)" in capsys.readouterr().err
    # A checkpoint whose LFW validation chose a threshold (same weights, so the gallery fits).
    with_val = _model(tmp_path / "validated.pt", metrics={"val_accuracy": 0.9, "threshold": 0.42})
    argv[argv.index("--model") + 1] = str(with_val)
    assert main(argv) == 0
    assert "threshold 0.420 (the checkpoint's LFW validation)" in capsys.readouterr().err


# ------------------------------------------------------------------------- search and figures


def test_search_backends_agree_with_a_per_identity_loop() -> None:
    rng = np.random.default_rng(0)
    templates = normalize(rng.standard_normal((3000, 32)))
    queries = normalize(rng.standard_normal((70, 32)))
    naive = np.array([[float(q @ t) for t in templates] for q in queries[:5]])
    backends = ["numpy"] + (["faiss"] if faiss_available() else [])
    for backend in backends:
        idx, scores = TemplateIndex(templates, backend=backend, chunk=16).search(queries, 4)
        assert idx.shape == (70, 4) and np.all(np.diff(scores, axis=1) <= 1e-6)
        assert np.array_equal(idx[:5], np.argsort(-naive, axis=1)[:, :4])
        assert np.allclose(scores[:5], np.sort(naive, axis=1)[:, ::-1][:, :4], atol=1e-5)
    idx, _ = TemplateIndex(templates[:3], backend="numpy").search(queries[:2], 10)  # k > gallery size
    assert idx.shape == (2, 3)


def test_rank_and_open_set_figures() -> None:
    top = np.array([[0, 1], [2, 0], [1, 2], [3, 1]])
    truth = np.array([0, 0, 0, 0])
    assert rank_k_accuracy(top, truth, 1) == 0.25 and rank_k_accuracy(top, truth, 2) == 0.5
    impostors = np.array([0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.0, -0.1, -0.2])
    genuine, correct = np.array([0.95, 0.6, 0.45, 0.8]), np.array([True, True, True, False])
    rate, thr = open_set_rate(genuine, correct, impostors, 0.1)
    assert thr == 0.5 and rate == 0.5  # one impostor in ten above 0.5; 0.45 is rejected, 0.8 is wrong


# ------------------------------------------------------------------------------------ real LFW


@pytest.mark.slow
@pytest.mark.skipif(
    not (LFW / "lfw").is_dir() or not REFERENCE.is_file(),
    reason=f"real LFW ({LFW}/lfw) or the reference model ({REFERENCE}) not found",
)
@long_real_lfw
def test_lfw_identification_with_the_reference_model(tmp_path: Path) -> None:
    """Gallery: one photo of each of the 1,680 LFW people with two or more; probes: their other
    7,484 photos; impostors: the 4,069 people with one photo. Slow: detection and embedding of all
    13,232 photos (~9 min on 2 cores)."""
    from eval.identification.lfw_figures import identification_figures
    from eval.import_mobilefacenet import main as import_main

    ckpt = tmp_path / "reference.pt"
    assert import_main(["--source", str(REFERENCE), "--out", str(ckpt), "--image-size", "112x96"]) == 0
    figures = identification_figures(LFW / "lfw", ckpt, workers=2)
    assert figures["gallery_people"] == 1680 and figures["genuine_probes"] == 7484
    assert figures["faces_found"] > 0.99
    assert figures["rank1"] >= RANK1_MEASURED - 0.01, figures
    assert figures["rank5"] >= figures["rank1"]


# Measured with `python bench/identify.py lfw --model reference.pt` (flip on): rank-1 0.9578, rank-5
# 0.9884, open-set rate 0.759 at FAR 1% (threshold 0.587) and 0.322 at FAR 0.1%; 512 s on 2 cores.
RANK1_MEASURED = 0.9578


def _nan_model(path: Path) -> Path:
    """What a diverged run saves: the same layout, every float weight NaN."""
    torch.manual_seed(0)
    net = build_backbone("tiny", 64, (112, 112))
    state = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in net.state_dict().items()
    }
    spec = {"backbone": "tiny", "embedding_size": 64, "image_size": [112, 112]}
    save_embedding_checkpoint(path, spec, state)
    return path


def test_enrol_with_a_nan_model_is_refused_and_writes_no_gallery(
    enrolled: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "GALLERY.npz"
    nan = _nan_model(tmp_path / "nan.pt")
    argv = ["enrol", "--gallery", str(enrolled["gallery"]), "--out", str(out), "--workers", "0", "--model"]
    err = _one_line_error([*argv, str(nan)], capsys)
    assert str(nan) in err and "NaN or infinite" in err and "weight tensors" in err
    assert not out.exists()
    # A model whose weights are finite but whose embeddings are not (an ONNX file, an overflow).
    from eval import identify

    monkeypatch.setattr(identify, "embed_crops", lambda *a, **k: np.full((3, 64), np.nan, np.float32))
    code = run_cli(main, [*argv, str(enrolled["model"])])  # the gallery's bad photos warn first
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and all(line.startswith("warning: ") for line in lines[:-1]), lines
    err = lines[-1]
    assert "3 of 3 embeddings are NaN or infinite" in err and "no gallery written" in err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_search_on_a_gallery_of_nan_templates_is_refused_in_one_line(
    enrolled: dict[str, Path], people, tmp_path: Path, capsys
) -> None:
    with np.load(enrolled["npz"], allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["templates"] = np.full_like(arrays["templates"], np.nan)
    bad = tmp_path / "nan_gallery.npz"
    np.savez(bad, **arrays)
    model = str(enrolled["model"])
    err = _one_line_error(["search", "--gallery", str(bad), "--model", model, str(people["ana"][0])], capsys)
    assert str(bad) in err and "2 of 2 embeddings are NaN or infinite (first: 'ana')" in err
