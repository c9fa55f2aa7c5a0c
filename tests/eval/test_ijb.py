"""eval/ijb.py on a generated mini-IJB-C in the published layout: alignment by the 5 points, media
pooling against a hand computation, and TAR at FAR on pairs whose order is known by construction."""

from __future__ import annotations

import json
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
    assert code == 2 and len(err.splitlines()) == 1 and "1.jpg: missing" in err
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
