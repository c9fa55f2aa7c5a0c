"""eval/ijb.py on a generated mini-IJB-C in the published layout: alignment by the 5 points, media
pooling against a hand computation, and TAR at FAR on pairs whose order is known by construction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.cli import UserError, run_cli
from eval.ijb import evaluate_ijb, main, read_ijb, template_features
from models.backbones import build_backbone
from models.model_file import save_embedding_checkpoint
from preprocess.align import similarity_transform, template

SIZE = (112, 112)
# Subject colours (RGB pixels). S3 is close to S0: the one hard impostor pair.
COLORS = {0: (230, 25, 25), 1: (25, 230, 25), 2: (25, 25, 230), 3: (200, 90, 25), 4: (230, 230, 25)}
OFF = (25, 230, 230)  # one media of S2's second template: its one hard genuine pair
# template -> (subject, [frames per media]); template 2s + 1 and 2s + 2 belong to subject s.
TEMPLATES = {
    1: (0, [3, 1]),
    2: (0, [2]),
    3: (1, [1, 2]),
    4: (1, [1]),
    5: (2, [2, 1]),
    6: (2, [1, 1]),
    7: (3, [2]),
    8: (3, [1]),
    9: (4, [1, 3]),
    10: (4, [2]),
}
GENUINE = [(1, 2), (3, 4), (5, 6), (9, 10)]
IMPOSTOR = [(1, 7), (1, 3), (1, 5), (1, 9), (3, 5), (3, 7), (4, 10), (5, 9), (2, 6), (6, 8)]


def color_model(images: torch.Tensor) -> np.ndarray:
    """A stand-in embedding model: each face's mean colour (model input space), 3-d."""
    return images.mean(dim=(2, 3)).numpy().astype(np.float32)


def _face_color(tid: int, media_index: int) -> tuple[int, int, int]:
    subject, _ = TEMPLATES[tid]
    return OFF if (tid, media_index) == (6, 1) else COLORS[subject]


def make_ijb(root: Path) -> dict[int, list[tuple[int, tuple[int, int, int]]]]:
    """Writes loose_crop/ and meta/; returns template -> [(media id, pixel colour) per face]."""
    rng = np.random.default_rng(0)
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    faces, pts_rows, truth = [], [], {}
    n, media_id = 0, 100
    for tid, (_, frames) in TEMPLATES.items():
        truth[tid] = []
        for k, count in enumerate(frames):
            media_id += 1
            for _ in range(count):
                n += 1
                # The face sits anywhere in a 520x520 black photo, scaled and turned.
                angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(1.3, 1.8)
                rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
                pts = template(SIZE) @ rot.T + rng.uniform([150, 150], [170, 170])
                inverse = similarity_transform(template(SIZE), pts)
                corners = np.array([[-40, -40], [152, -40], [152, 152], [-40, 152]], np.float64)
                poly = (corners @ inverse[:, :2].T + inverse[:, 2]).astype(np.int32)
                assert poly.min() >= 0 and poly.max() < 520
                image = np.zeros((520, 520, 3), np.uint8)
                rgb = _face_color(tid, k)
                cv2.fillConvexPoly(image, poly, rgb[::-1])  # BGR on disk
                cv2.imwrite(str(root / "loose_crop" / f"{n}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 98])
                faces.append(f"{n}.jpg {tid} {media_id}")
                pts_rows.append(f"{n}.jpg " + " ".join(f"{v:.3f}" for v in pts.reshape(-1)) + " 0.99")
                truth[tid].append((media_id, rgb))
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(faces) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(pts_rows) + "\n")
    pairs = [f"{a} {b} 1" for a, b in GENUINE] + [f"{a} {b} 0" for a, b in IMPOSTOR]
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return truth


def _jpeg_rgb(rgb: tuple[int, int, int]) -> np.ndarray:
    """The colour a uniform patch has after the JPEG round trip (saturated colours shift a little)."""
    patch = np.full((64, 64, 3), rgb[::-1], np.uint8)
    ok, buf = cv2.imencode(".jpg", patch, [cv2.IMWRITE_JPEG_QUALITY, 98])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[32, 32, ::-1].astype(np.float64)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def hand_template(faces: list[tuple[int, tuple[int, int, int]]]) -> np.ndarray:
    """Per media the mean of its faces' unit colour vectors, then the mean of the media, normalized."""
    per_media: dict[int, list[np.ndarray]] = {}
    for mid, rgb in faces:
        per_media.setdefault(mid, []).append(_unit(_jpeg_rgb(rgb) / 127.5 - 1.0))
    return _unit(np.mean([np.mean(v, axis=0) for v in per_media.values()], axis=0))


@pytest.fixture(scope="module")
def mini_ijb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ijb") / "IJBC"
    return root, make_ijb(root)


def test_scores_match_hand_media_pooling_and_known_tar(mini_ijb: tuple[Path, dict]) -> None:
    root, truth = mini_ijb
    metrics, scores, labels = evaluate_ijb(
        color_model, root, SIZE, batch_size=3, workers=2, show_progress=False
    )
    feat = {t: hand_template(f) for t, f in truth.items()}
    expected = np.array([feat[a] @ feat[b] for a, b in GENUINE + IMPOSTOR])
    # Alignment by the 5 points puts the whole crop inside the face: else black would enter the mean.
    np.testing.assert_allclose(scores, expected, atol=2e-3)
    assert labels.tolist() == [True] * 4 + [False] * 10
    # By construction: the hard impostor (S0 vs S3, ~0.94) beats the hard genuine pair (~0.82), no
    # other impostor does. FAR 1e-1 of 10 impostors lets one through: every genuine pair is accepted;
    # at any lower FAR none may pass: 3 of 4.
    assert expected[2] < expected[4] and np.sort(expected[4:])[-2] < expected[:4].min()
    assert metrics["tar_at_far_1e-1"] == 1.0
    for far in ("1e-2", "1e-3", "1e-4", "1e-5", "1e-6"):
        assert metrics[f"tar_at_far_{far}"] == 0.75, far
    assert metrics["num_templates"] == 10 and metrics["num_faces"] == sum(
        sum(fr) for _, fr in TEMPLATES.values()
    )


def test_media_pooling_weighs_media_not_frames() -> None:
    emb = np.array([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    tids = np.array([7, 7, 7, 7, 3])
    mids = np.array([1, 1, 1, 2, 9])
    ids, feat = template_features(emb, tids, mids)
    assert ids.tolist() == [3, 7]
    # media 1 (three frames) and media 2 (one) weigh alike: (1, 1, 0) / sqrt 2, not (3, 1, 0) / sqrt 10
    np.testing.assert_allclose(feat[1], [2**-0.5, 2**-0.5, 0], atol=1e-12)
    np.testing.assert_allclose(feat[0], [0, 0, 1], atol=1e-12)


def test_command_writes_json_and_roc(
    mini_ijb: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = mini_ijb
    ckpt = tmp_path / "tiny.pt"
    save_embedding_checkpoint(
        ckpt,
        {"backbone": "tiny", "embedding_size": 16, "image_size": [112, 112]},
        build_backbone("tiny", 16, SIZE).state_dict(),
    )
    out, roc = tmp_path / "m.json", tmp_path / "roc.png"
    assert (
        main(
            [
                "--checkpoint",
                str(ckpt),
                "--ijb",
                str(root),
                "--json",
                str(out),
                "--roc",
                str(roc),
                "--batch-size",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert line.startswith("IJBC 1:1 TAR@FAR  1e-06: ") and "14 pairs, 10 templates" in line
    m = json.loads(out.read_text())
    assert {"tar_at_far_1e-6", "tar_at_far_1e-1", "auc", "num_pairs", "seconds"} <= set(m)
    assert roc.stat().st_size > 1000


def test_layout_mistakes_are_one_line(
    mini_ijb: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = mini_ijb
    with pytest.raises(UserError, match="no ijbc_face_tid_mid.txt"):
        read_ijb(tmp_path)
    broken = tmp_path / "IJBC"
    (broken / "meta").mkdir(parents=True)
    for f in (root / "meta").iterdir():
        (broken / "meta" / f.name).write_text(f.read_text())
    (broken / "loose_crop").mkdir()  # the images are missing
    ckpt = tmp_path / "tiny.pt"
    save_embedding_checkpoint(
        ckpt,
        {"backbone": "tiny", "embedding_size": 16, "image_size": [112, 112]},
        build_backbone("tiny", 16, SIZE).state_dict(),
    )
    code = run_cli(main, ["--checkpoint", str(ckpt), "--ijb", str(broken), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert (
        code == 2
        and len(err.splitlines()) == 1
        and "none of the 24 faces can be used (image_missing 24;" in err
    )
    assert "loose_crop/1.jpg: image_missing" in err
    pts = broken / "meta" / "ijbc_name_5pts_score.txt"
    pts.write_text(pts.read_text().replace(" 0.99\n", "\n", 1))
    with pytest.raises(UserError, match=r"ijbc_name_5pts_score.txt:1: 11 fields, expected 12"):
        read_ijb(broken)


def test_pair_list_mistakes_name_the_line(mini_ijb: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = mini_ijb
    broken = tmp_path / "IJBC"
    (broken / "meta").mkdir(parents=True)
    for f in (root / "meta").iterdir():
        (broken / "meta" / f.name).write_text(f.read_text())
    pairs = broken / "meta" / "ijbc_template_pair_label.txt"
    good = pairs.read_text()
    pairs.write_text(good.replace("3 4 1", "3 x 1"))
    with pytest.raises(UserError, match=r"ijbc_template_pair_label.txt:2: expected integers"):
        read_ijb(broken)
    pairs.write_text(good.replace("3 4 1", "3 4"))
    with pytest.raises(UserError, match=r"ijbc_template_pair_label.txt:2: 2 fields, expected 3"):
        read_ijb(broken)
    pairs.write_text(good.replace("3 4 1", "3 4 2"))
    with pytest.raises(UserError, match=r"pair 2: label must be 0 or 1, got 2"):
        read_ijb(broken)


def test_pair_cosines_in_chunks_equal_one_gather() -> None:
    from eval.ijb import pair_cosines

    rng = np.random.default_rng(0)
    feat = rng.normal(size=(20, 8))
    rows = rng.integers(0, 20, size=(101, 2))
    np.testing.assert_allclose(
        pair_cosines(feat, rows, chunk=7),
        np.einsum("ij,ij->i", feat[rows[:, 0]], feat[rows[:, 1]]),
        atol=1e-12,
    )


def _copy(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "IJBC"
    shutil.copytree(root, copy)
    return copy


def _edit_points(root: Path, edits: dict[int, np.ndarray]) -> None:
    """Replaces the 5 points of faces `edits` (face number -> (5, 2) points) in the landmarks file."""
    pts = root / "meta" / "ijbc_name_5pts_score.txt"
    rows = pts.read_text().splitlines()
    for n, points in edits.items():
        rows[n - 1] = f"{n}.jpg " + " ".join(str(v) for v in np.asarray(points).reshape(-1)) + " 0.99"
    pts.write_text("\n".join(rows) + "\n")


def _points(root: Path, n: int) -> np.ndarray:
    row = (root / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()[n - 1].split()
    return np.array(row[1:11], np.float64).reshape(5, 2)


def test_faces_that_cannot_be_used_are_rejects_and_the_rest_is_scored(
    mini_ijb: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A NaN landmark, a missing and an empty image, points on a line, outside the image or with
    the eyes on one spot: each face is left out of its template (the others pool the rest); template
    8 loses its only face, so its one pair (6, 8) is left out of the figures, and every reject is
    reported with its file and line."""
    root, truth = mini_ijb
    broken = _copy(root, tmp_path)
    one_eye = _points(root, 18)
    one_eye[1] = one_eye[0]
    line = np.stack([np.linspace(100, 300, 5), np.linspace(100, 200, 5)], axis=1)
    _edit_points(
        broken,
        {2: np.where(np.eye(5, 2, dtype=bool), np.nan, _points(root, 2)), 12: line, 18: one_eye},
    )
    _edit_points(broken, {20: _points(root, 20) + [1000.0, 0.0]})
    (broken / "loose_crop" / "4.jpg").unlink()
    (broken / "loose_crop" / "8.jpg").write_bytes(b"")
    rejected = {2: "landmarks_nan", 4: "image_missing", 8: "image_unreadable", 12: "landmarks_collinear"}
    rejected |= {18: "landmarks_degenerate", 20: "landmarks_outside_image"}
    metrics, scores, labels = evaluate_ijb(
        color_model, broken, SIZE, batch_size=3, workers=2, show_progress=False
    )
    faces, n = {}, 0  # template -> the faces that remain, as make_ijb numbered them
    for tid, face_list in truth.items():
        faces[tid] = []
        for face in face_list:
            n += 1
            if n not in rejected:
                faces[tid].append(face)
    feat = {t: hand_template(f) for t, f in faces.items() if f}
    pairs = [p for p in GENUINE + IMPOSTOR if p != (6, 8)]
    np.testing.assert_allclose(scores, [feat[a] @ feat[b] for a, b in pairs], atol=2e-3)
    assert labels.tolist() == [True] * 4 + [False] * 9
    assert metrics["num_faces"] == 18 and metrics["num_faces_rejected"] == 6
    assert metrics["rejects_by_reason"] == {r: 1 for r in rejected.values()}
    assert (
        metrics["num_pairs"] == 13 and metrics["skipped_pairs"] == 1 and metrics["skipped_genuine_pairs"] == 0
    )
    assert metrics["templates_without_faces"] == 1 and metrics["templates_missing_faces"] == 4
    pts_file = str(broken / "meta" / "ijbc_name_5pts_score.txt")
    assert [(r["image"], r["reason"], r["where"]) for r in metrics["rejected_faces"]] == [
        (
            f"{n}.jpg",
            reason,
            str(broken / "loose_crop" / f"{n}.jpg") if reason.startswith("image") else f"{pts_file}:{n}",
        )
        for n, reason in rejected.items()
    ]
    # The command: one warning line per reject, naming the file (and line), then what they cost.
    ckpt = tmp_path / "tiny.pt"
    save_embedding_checkpoint(
        ckpt,
        {"backbone": "tiny", "embedding_size": 16, "image_size": [112, 112]},
        build_backbone("tiny", 16, SIZE).state_dict(),
    )
    out = tmp_path / "m.json"
    assert main(["--checkpoint", str(ckpt), "--ijb", str(broken), "--json", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 7 and warnings[0].startswith(f"warning: {pts_file}:2: landmarks_nan (")
    missing = broken / "loose_crop" / "4.jpg"
    assert warnings[1] == f"warning: {missing}: image_missing (no such file), face 4.jpg not embedded"
    assert warnings[-1] == (
        "warning: IJBC: 6 of 24 faces not embedded (landmarks_nan 1, image_missing 1, image_unreadable 1, "
        "landmarks_collinear 1, landmarks_degenerate 1, landmarks_outside_image 1); 4 templates pooled from "
        "their other faces; 1 templates with no face left: 1 of 14 pairs (0 genuine, 1 impostor) left out of "
        "the figures"
    )
    assert "13 pairs, 9 templates, 18 faces" in captured.out
    assert json.loads(out.read_text())["skipped_pairs"] == 1


def test_metadata_damage_is_one_line_naming_the_file_and_line(
    mini_ijb: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = mini_ijb
    broken = _copy(root, tmp_path)
    meta = broken / "meta"
    files = {f.name: f.read_text() for f in meta.iterdir()}
    cases = [
        (
            "ijbc_face_tid_mid.txt",
            "2.jpg 1 101",
            "/etc/passwd 1 101",
            r"face_tid_mid.txt:2: image name '/etc/passwd' is not a file under loose_crop/",
        ),
        (
            "ijbc_face_tid_mid.txt",
            "2.jpg 1 101",
            "../2.jpg 1 101",
            r"face_tid_mid.txt:2: image name '../2.jpg' is not",
        ),
        ("ijbc_face_tid_mid.txt", "2.jpg 1 101", "2.jpg 1", r"face_tid_mid.txt:2: 2 fields, expected 3"),
        (
            "ijbc_face_tid_mid.txt",
            "2.jpg 1 101",
            "2.jpg one 101",
            r"face_tid_mid.txt:2: expected integers, got 'one 101'",
        ),
        (
            "ijbc_name_5pts_score.txt",
            "2.jpg ",
            "2.jpg x",
            r"5pts_score.txt:2: landmarks must be numbers, got 'x",
        ),
        (
            "ijbc_template_pair_label.txt",
            "3 4 1",
            "3 99 1",
            r"template_pair_label.txt: pair 2: template 99 has no faces in ijbc_face_tid_mid.txt",
        ),
    ]
    for name, old, new, message in cases:
        (meta / name).write_text(files[name].replace(old, new, 1))
        with pytest.raises(UserError, match=message):
            read_ijb(broken)
        (meta / name).write_text(files[name])
    first_points = files["ijbc_name_5pts_score.txt"].splitlines()[0]
    (meta / "ijbc_name_5pts_score.txt").write_text(
        files["ijbc_name_5pts_score.txt"] + first_points.replace("1.jpg 1", "1.jpg 2") + "\n"
    )
    with pytest.raises(UserError, match=r"5pts_score.txt:25: other points for face '1.jpg' than on line 1"):
        read_ijb(broken)
    (meta / "ijbc_name_5pts_score.txt").write_text(files["ijbc_name_5pts_score.txt"] + first_points + "\n")
    assert read_ijb(broken).landmark_lines[0].endswith("5pts_score.txt:25")  # the same row twice: harmless
    (meta / "ijbc_face_tid_mid.txt").write_text("\n")
    with pytest.raises(UserError, match=r"face_tid_mid.txt: no faces listed"):
        read_ijb(broken)
    (meta / "ijbc_face_tid_mid.txt").write_bytes(b"1.jpg 1 \xff\n")
    with pytest.raises(UserError, match=r"face_tid_mid.txt: unreadable"):
        read_ijb(broken)
    (meta / "ijbc_face_tid_mid.txt").write_text(files["ijbc_face_tid_mid.txt"])
    genuine_only = "".join(
        line + "\n" for line in files["ijbc_template_pair_label.txt"].splitlines() if line.endswith(" 1")
    )
    (meta / "ijbc_template_pair_label.txt").write_text(genuine_only)
    with pytest.raises(UserError, match=r"template_pair_label.txt: only genuine pairs"):
        read_ijb(broken)
    (meta / "ijbc_template_pair_label.txt").write_text(files["ijbc_template_pair_label.txt"])
    shutil.rmtree(broken / "loose_crop")
    with pytest.raises(UserError, match=r"IJBC/loose_crop: no such folder"):
        read_ijb(broken)


def test_no_impostor_pair_left_is_one_line(mini_ijb: tuple[Path, dict], tmp_path: Path) -> None:
    """Every impostor pair uses template 1, 3, 4, 5, 6 or 8: their faces all missing leaves only
    the genuine pair (9, 10), and the figures would mean nothing."""
    root, _ = mini_ijb
    broken = _copy(root, tmp_path)
    for line in (broken / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines():
        name, tid, _ = line.split()
        if int(tid) in (1, 3, 4, 5, 6, 8):
            (broken / "loose_crop" / name).unlink()
    with pytest.raises(
        UserError,
        match=r"IJBC: no impostor pair is left once the faces that cannot be used are left out "
        r"\(image_missing 14; first: .*loose_crop/1.jpg: image_missing",
    ):
        evaluate_ijb(color_model, broken, SIZE, batch_size=3, workers=1, show_progress=False)
