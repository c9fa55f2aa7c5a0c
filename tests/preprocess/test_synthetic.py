"""preprocess/synthetic.py: the real layouts, landmarks on the features, determinism, calibration ends.

The contact sheet of generated faces with their landmarks drawn goes to the session's pytest temp
folder (its path is printed; run with -s to see it).
"""

from __future__ import annotations

import csv
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.cli import UserError, run_cli
from preprocess import synthetic
from preprocess.align import similarity_transform, template
from preprocess.datasets import read_lfw, read_vggface2

REPO = Path(__file__).resolve().parents[2]
LANDMARK_BGR = ((0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 0, 255))


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _vgg_landmarks(root: Path) -> dict[str, np.ndarray]:
    with open(root / "bb_landmark" / "loose_landmark_train.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["NAME_ID"] + [f"P{i}{c}" for i in range(1, 6) for c in "XY"]
    return {r[0]: np.array(r[1:], dtype=float).reshape(5, 2) for r in rows[1:]}


def _lfw_landmarks(root: Path) -> dict[str, np.ndarray]:
    out = {}
    for line in _lines(root / "lfw_landmark.txt"):
        name, rest = line.split("\t")
        out[name] = np.array(rest.split(" "), dtype=float).reshape(5, 2)
    return out


def _inside(points: np.ndarray, image: np.ndarray) -> bool:
    h, w = image.shape[:2]
    return bool(((points >= 0) & (points < [w, h])).all())


def _roll(points: np.ndarray) -> float:
    """In-plane angle of the eye line, degrees."""
    d = points[1] - points[0]
    return math.degrees(math.atan2(d[1], d[0]))


def test_vggface2_layout(synthetic_raw: Path) -> None:
    root = synthetic_raw / "vggface2"
    listed = _lines(root / "train_list.txt")
    assert len(listed) == 12 * 6 and len(set(listed)) == len(listed)
    assert all(re.fullmatch(r"n\d{6}/\d{4}_\d{2}\.jpg", rel) for rel in listed)
    on_disk = sorted(str(p.relative_to(root / "train")) for p in (root / "train").glob("*/*.jpg"))
    assert on_disk == sorted(listed)

    landmarks = _vgg_landmarks(root)
    assert sorted(landmarks) == sorted(rel[:-4] for rel in listed)  # NAME_ID has no extension
    with open(root / "bb_landmark" / "loose_bb_train.csv", newline="") as f:
        boxes = {r[0]: [int(v) for v in r[1:]] for r in list(csv.reader(f))[1:]}
    assert sorted(boxes) == sorted(landmarks)
    sizes = set()
    for rel in listed:
        image = cv2.imread(str(root / "train" / rel))
        assert image is not None, rel
        sizes.add(image.shape[:2])
        pts = landmarks[rel[:-4]]
        assert _inside(pts, image), rel
        assert pts[0, 0] < pts[1, 0] or abs(_roll(pts)) > 60, f"{rel}: left eye should be the left one"
        x, y, w, h = boxes[rel[:-4]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= image.shape[1] and y + h <= image.shape[0]
        # The box holds the eyes and the mouth corners (a detector's face box).
        assert ((pts[[0, 1, 3, 4]] >= [x - 2, y - 2]) & (pts[[0, 1, 3, 4]] <= [x + w + 2, y + h + 2])).all()
    assert len(sizes) > 10, "loose crops should come in varying sizes"
    assert all(180 <= min(s) and max(s) <= 400 * 1.3 + 1 for s in sizes)

    meta = _lines(root / "meta" / "identity_meta.csv")
    assert meta[0] == "Class_ID, Name, Sample_Num, Flag, Gender"
    ids = [row.split(", ")[0] for row in meta[1:]]
    assert ids == sorted({rel.split("/")[0] for rel in listed})
    assert all(row.split(", ")[2] == "6" and row.split(", ")[4] in ("m", "f") for row in meta[1:])


def test_lfw_layout_and_pairs(synthetic_raw: Path) -> None:
    root = synthetic_raw / "lfw"
    landmarks = _lfw_landmarks(root)
    on_disk = sorted(str(p.relative_to(root / "lfw")) for p in (root / "lfw").glob("*/*.jpg"))
    assert on_disk == sorted(landmarks)
    for rel in on_disk:
        name, file = rel.split("/")
        assert re.fullmatch(re.escape(name) + r"_\d{4}\.jpg", file)
        image = cv2.imread(str(root / "lfw" / rel))
        assert image.shape == (250, 250, 3)
        assert _inside(landmarks[rel], image), rel

    lines = [line.split("\t") for line in _lines(root / "pairs.txt")]
    folds, per_fold = int(lines[0][0]), int(lines[0][1])
    assert folds == 10 and 0 < per_fold <= 300 and len(lines) == 1 + folds * per_fold * 2
    people_in_fold: list[set[str]] = []
    for f in range(folds):
        block = lines[1 + f * 2 * per_fold : 1 + (f + 1) * 2 * per_fold]
        same, diff = block[:per_fold], block[per_fold:]
        assert all(len(p) == 3 and p[1] != p[2] for p in same)
        assert all(len(p) == 4 and p[0] != p[2] for p in diff)
        assert len({tuple(p) for p in block}) == len(block), "a pair repeats"
        people = set()
        for p in block:
            refs = [(p[0], p[1]), (p[0], p[2])] if len(p) == 3 else [(p[0], p[1]), (p[2], p[3])]
            for name, number in refs:
                assert f"{name}/{name}_{int(number):04d}.jpg" in landmarks, (name, number)
                people.add(name)
        people_in_fold.append(people)
    # As in LFW View 2, the folds are made of different people.
    assert sum(len(p) for p in people_in_fold) == len(set().union(*people_in_fold))

    train_names = {
        row.split(", ")[1].strip('"') for row in _lines(synthetic_raw / "vggface2/meta/identity_meta.csv")[1:]
    }
    lfw_names = {rel.split("/")[0] for rel in on_disk}
    assert len(lfw_names) == 20 and not lfw_names & train_names


def test_readers_take_it_as_real_data(synthetic_raw: Path) -> None:
    """The real-data readers of build_shards find every image, every landmark row and every pair."""
    vgg = read_vggface2(synthetic_raw / "vggface2", "train")
    assert len(vgg.entries) == 72 and all(e.reason is None for e in vgg.entries)
    lfw = read_lfw(synthetic_raw / "lfw")
    assert all(e.reason is None for e in lfw.entries)
    rels = {e.rel for e in lfw.entries}
    assert lfw.pairs and all(a in rels and b in rels for a, b, _, _ in lfw.pairs)
    assert {fold for *_, fold in lfw.pairs} == set(range(10))


def test_landmarks_sit_on_the_features(synthetic_raw: Path) -> None:
    """Aligned with the written landmarks, the eyes land on the template's eye points: they are the
    darkest of the probed spots on average (a wrong order, a mirror or an offset would move them)."""
    lfw = read_lfw(synthetic_raw / "lfw")
    t = template((112, 112))
    stack = []
    for e in lfw.entries:
        grey = cv2.imread(str(lfw.image_root / e.rel), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        m = similarity_transform(np.array(e.landmarks).reshape(5, 2), t)
        stack.append(cv2.warpAffine(grey, m, (112, 112)))
    mean = np.mean(stack, 0)

    def at(p: np.ndarray) -> float:
        x, y = int(round(p[0])), int(round(p[1]))
        return float(mean[y - 1 : y + 2, x - 1 : x + 2].mean())

    eyes = (at(t[0]) + at(t[1])) / 2
    for probe in (
        (t[0] + t[1]) / 2,
        t[0] + [0, 8],
        t[1] + [0, 8],
        np.array([30.0, 72.0]),
        np.array([82.0, 72.0]),
    ):
        assert eyes < at(probe) - 12, (eyes, probe, at(probe))


def test_crops_are_not_aligned(synthetic_raw: Path) -> None:
    """Alignment must matter: the eyes wander in position, scale and in-plane angle across photographs."""
    pts = np.stack(list(_lfw_landmarks(synthetic_raw / "lfw").values()))
    rolls = np.array([_roll(p) for p in pts])
    eye_dist = np.linalg.norm(pts[:, 1] - pts[:, 0], axis=1)
    assert rolls.std() > 5 and np.abs(rolls).max() > 12 and np.abs(rolls).max() < 40
    assert pts[:, 0].std(0).min() > 3 and eye_dist.std() > 2
    # LFW framing: the face roughly centred in the 250x250 image.
    assert np.abs(pts.mean((0, 1)) - [125, 125]).max() < 25


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_any_workers(tmp_path: Path) -> None:
    args = [
        "--identities",
        "3",
        "--images-per-identity",
        "3",
        "--lfw-identities",
        "20",
        "--pairs-per-fold",
        "2",
    ]
    assert synthetic.main(["--out", str(tmp_path / "a"), *args, "--workers", "1"]) == 0
    assert synthetic.main(["--out", str(tmp_path / "b"), *args, "--workers", "2"]) == 0
    assert synthetic.main(["--out", str(tmp_path / "c"), *args, "--workers", "1", "--seed", "1"]) == 0
    a, b, c = (_tree(tmp_path / x) for x in "abc")
    assert len(a) > 100 and a == b
    assert a.keys() != c.keys() or a != c
    jpgs = [k for k in a if k.startswith("vggface2/train/") and k in c]
    assert jpgs and all(a[k] != c[k] for k in jpgs)
    # Rerunning into a folder it made replaces it.
    assert synthetic.main(["--out", str(tmp_path / "a"), *args, "--workers", "1"]) == 0
    assert _tree(tmp_path / "a") == b


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lfw-identities", "5"], "--lfw-identities 5"),
        (["--lfw-identities", "20", "--pairs-per-fold", "5000"], "--pairs-per-fold 5000"),
        (["--identities", "0"], "--identities"),
        (["--identities", "many"], "--identities"),
    ],
)
def test_bad_arguments_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "preprocess/synthetic.py",
            "--out",
            str(tmp_path / "o"),
            "--images-per-identity",
            "1",
            *argv,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_refuses_to_clear_a_folder_it_did_not_make(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--identities", "1", "--images-per-identity", "1", "--lfw-identities", "20", "--workers", "1"]
    assert synthetic.main(["--out", str(tmp_path), *argv]) == 0
    made = _tree(tmp_path / "vggface2")
    real = tmp_path / "lfw"
    shutil.rmtree(real)
    real.mkdir()
    (real / "pairs.txt").write_text("precious\n")
    assert run_cli(synthetic.main, ["--out", str(tmp_path), *argv]) == 2
    assert str(real) in capsys.readouterr().err
    assert (real / "pairs.txt").read_text() == "precious\n"
    assert _tree(tmp_path / "vggface2") == made, "nothing is cleared before every folder is checked"
    (tmp_path / "afile").write_text("x")
    assert run_cli(synthetic.main, ["--out", str(tmp_path / "afile"), *argv]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_help_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "preprocess/synthetic.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "--lfw-identities" in proc.stdout and "--pairs-per-fold" in proc.stdout


def test_contact_sheet(synthetic_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Writes a PNG of generated faces with their landmarks drawn (look at it), and checks what the
    generator drew under the landmarks: the sheet's faces (both layouts), aligned by their own
    points and averaged, have their eyes darker than the skin between and below them (landmarks
    off their features fail this)."""
    cells = []
    vgg = _vgg_landmarks(synthetic_raw / "vggface2")
    for name_id in sorted(vgg)[:24]:
        cells.append((synthetic_raw / "vggface2" / "train" / f"{name_id}.jpg", vgg[name_id]))
    lfw = _lfw_landmarks(synthetic_raw / "lfw")
    for rel in sorted(lfw)[:24]:
        cells.append((synthetic_raw / "lfw" / "lfw" / rel, lfw[rel]))
    t = template((112, 112))
    tiles, crops = [], []
    for path, pts in cells:
        image = cv2.imread(str(path))
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
        crops.append(cv2.warpAffine(grey, similarity_transform(pts, t), (112, 112)))
        for (x, y), colour in zip(pts, LANDMARK_BGR):
            cv2.circle(
                image, (int(round(x)), int(round(y))), max(2, image.shape[1] // 90), colour, -1, cv2.LINE_AA
            )
        tile = cv2.resize(
            image, (160, int(160 * image.shape[0] / image.shape[1])), interpolation=cv2.INTER_AREA
        )
        tile = cv2.copyMakeBorder(
            tile, 0, 210 - tile.shape[0], 0, 0, cv2.BORDER_CONSTANT, value=(255, 255, 255)
        )
        tiles.append(tile)
    rows = [np.hstack(tiles[i : i + 8]) for i in range(0, len(tiles), 8)]
    out = tmp_path_factory.getbasetemp() / "synthetic_contact_sheet.png"
    assert cv2.imwrite(str(out), np.vstack(rows)) and len(tiles) == 48
    print(f"\ncontact sheet: {out}")
    mean = np.mean(crops, 0)

    def at(p: np.ndarray) -> float:
        x, y = int(round(p[0])), int(round(p[1]))
        return float(mean[y - 1 : y + 2, x - 1 : x + 2].mean())

    eyes = max(at(t[0]), at(t[1]))
    for probe in ((t[0] + t[1]) / 2, t[0] + [0, 9], t[1] + [0, 9]):
        assert eyes < at(probe) - 10, (eyes, probe, at(probe))


def test_calibration_raw_pixels_and_untrained_net(tmp_path: Path) -> None:
    """The low end of the calibration on ~700 LFW-layout images (~10 s): raw pixels of the unaligned
    images near chance, an untrained tiny network well below what training reaches (>= 0.9)."""
    import torch

    from eval.verification import verification_metrics
    from models.backbones import build_backbone

    argv = [
        "--out",
        str(tmp_path),
        "--identities",
        "1",
        "--images-per-identity",
        "1",
        "--lfw-identities",
        "100",
    ]
    assert synthetic.main(argv + ["--workers", "2"]) == 0
    lfw = read_lfw(tmp_path / "lfw")
    t = template((112, 112))
    raw, aligned, index = [], [], {}
    for i, e in enumerate(lfw.entries):
        image = cv2.imread(str(lfw.image_root / e.rel))
        raw.append(cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA).ravel().astype(np.float64))
        m = similarity_transform(np.array(e.landmarks).reshape(5, 2), t)
        aligned.append(cv2.warpAffine(image, m, (112, 112))[..., ::-1])
        index[e.rel] = i
    a = np.array([index[p[0]] for p in lfw.pairs])
    b = np.array([index[p[1]] for p in lfw.pairs])
    same = np.array([p[2] for p in lfw.pairs])
    folds = np.array([p[3] for p in lfw.pairs])

    def accuracy(emb: np.ndarray) -> float:
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        return verification_metrics((emb[a] * emb[b]).sum(1), same, folds)["accuracy_mean"]

    assert accuracy(np.stack(raw)) < 0.62
    torch.manual_seed(0)
    net = build_backbone("tiny", 128, (112, 112), width=32).eval()
    x = (torch.from_numpy(np.stack(aligned)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        emb = torch.cat([net(x[i : i + 128]) for i in range(0, len(x), 128)]).numpy()
    assert accuracy(emb) < 0.72


def test_every_accepted_size_finishes_or_is_refused_up_front() -> None:
    """The smallest LFW sets it accepts (2 identities per fold give few different-person pairs) plan
    their pairs at once; asking for more pairs than exist is one line before anything is drawn."""
    import signal

    def too_slow(*_):
        raise TimeoutError("make_pairs did not finish")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(30)
    try:
        for lfw_identities in (20, 21, 25, 30):
            args = synthetic.build_parser().parse_args(
                [
                    "--out",
                    "unused",
                    "--identities",
                    "20",
                    "--images-per-identity",
                    "10",
                    "--lfw-identities",
                    str(lfw_identities),
                ]
            )
            _, lfw, _ = synthetic.plan(args)
            n, lines = synthetic.make_pairs(lfw, None, np.random.default_rng(0))
            assert n > 0 and len(lines) == 2 * n * synthetic.FOLDS
            assert len({tuple(line) for line in lines}) == len(lines)
        with pytest.raises(UserError, match="different-person pairs"):
            args.lfw_identities = 20
            _, lfw, _ = synthetic.plan(args)
            synthetic.make_pairs(lfw, 40, np.random.default_rng(0))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
