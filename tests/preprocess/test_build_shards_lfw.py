"""build_shards on the real LFW copy in ../shared/data/lfw: counts, the missing image, pairs, real eyes."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.cli import run_cli
from preprocess import align
from preprocess.build_shards import main
from shards.manifest import load_manifest
from tests._real_lfw import LFW

pytestmark = pytest.mark.skipif(
    not (LFW / "lfw_landmark_150.txt").is_file(), reason=f"real LFW (lfw_landmark_150.txt) not found in {LFW}"
)
MISSING = "Betsy_Coffin/Betsy_Coffin_0001.jpg"  # in the landmark file, absent from the image set


def _build(out: Path, capsys, *extra: str) -> dict:
    code = run_cli(main, ["lfw", "--root", str(LFW), "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def _crops(manifest, count: int) -> list[tuple[np.ndarray, dict]]:
    out = []
    with tarfile.open(manifest.shard_paths()[0]) as tar:
        members = iter(tar)
        for member in members:
            jpg = tar.extractfile(member).read()
            next(members)  # .lbl
            record = json.loads(tar.extractfile(next(members)).read())
            out.append((cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR), record))
            if len(out) == count:
                break
    return out


def _sample(image: np.ndarray, x: float, y: float) -> float:
    """Grey level at a sub-pixel point, lightly smoothed so JPEG noise does not dominate."""
    gray = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32), (3, 3), 0.8)
    return float(cv2.getRectSubPix(gray, (1, 1), (float(x), float(y)))[0, 0])


def _patch(image: np.ndarray, x: float, y: float, r: int = 2) -> float:
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float64)
    xi, yi = int(round(x)), int(round(y))
    return float(gray[yi - r : yi + r + 1, xi - r : xi + r + 1].mean())


def test_lfw_subset_real_faces(tmp_path, capsys):
    """Identities up to Betsy_Coffin: the missing image is the one reject; real eyes land on the template."""
    names = sorted(p.name for p in (LFW / "lfw").iterdir())
    upto = sorted({*names, "Betsy_Coffin"}).index("Betsy_Coffin") + 1
    summary = _build(tmp_path / "o", capsys, "--identities", str(upto), "--samples-per-shard", "500")
    assert summary["reject_reasons"] == {"image_missing": 1}
    rejects = [json.loads(line) for line in (tmp_path / "o/rejects.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rejects] == [MISSING]
    manifest = load_manifest(tmp_path / "o")
    on_disk = sum(len(list((LFW / "lfw" / n).glob("*.jpg"))) for n in names[: upto - 1])
    assert manifest.num_samples == on_disk and manifest.num_classes == upto - 1
    assert manifest.split == "test" and "Betsy_Coffin" not in manifest.classes
    keys = set()
    for path in manifest.shard_paths():
        with tarfile.open(path) as tar:
            keys.update(m.name.split(".", 1)[0] for m in tar)
    assert manifest.pairs and all(p.a in keys and p.b in keys for p in manifest.pairs)
    assert summary["pairs"] + summary["pairs_unresolved"] == 6000

    tpl = align.template()
    crops = _crops(manifest, 200)
    # Each crop shows, where the fitted transform sends a landmark, the source image at that landmark
    # (the warp, the colour order and the coordinate conventions agree).
    errors = []
    for crop, record in crops[:30]:
        source = cv2.imread(str(LFW / "lfw" / record["source"]), cv2.IMREAD_COLOR)
        matrix = align.similarity_transform(record["landmarks"], tpl)
        for x, y in record["landmarks"]:
            u, v = matrix @ [x, y, 1.0]
            errors.append(abs(_sample(crop, u, v) - _sample(source, x, y)))
    assert np.median(errors) < 6 and np.percentile(errors, 90) < 20, sorted(errors)[-10:]
    # Independent of the landmark file: in the mean aligned face the eyes are darker than the skin
    # between and below them.
    mean = np.mean([c.astype(np.float64) for c, _ in crops], axis=0).astype(np.uint8)
    left, right = _patch(mean, *tpl[0]), _patch(mean, *tpl[1])
    bridge, cheek_l, cheek_r = (
        _patch(mean, 56, tpl[0][1] - 2),
        _patch(mean, tpl[0][0], 68),
        _patch(mean, tpl[1][0], 68),
    )
    assert max(left, right) + 10 < min(bridge, cheek_l, cheek_r), (left, right, bridge, cheek_l, cheek_r)


@pytest.mark.slow
def test_full_lfw_build(tmp_path, capsys):
    """The whole real LFW (13,233 inputs): about 12 s of CPU on 2 cores, hence slow-marked."""
    summary = _build(tmp_path / "o", capsys)
    assert summary["inputs"] == 13233 and summary["samples"] == 13232
    assert summary["reject_reasons"] == {"image_missing": 1} and summary["classes"] == 5748
    manifest = load_manifest(tmp_path / "o", verify="sha256")
    assert len(manifest.pairs) == 6000 and summary["pairs_unresolved"] == 0
    assert [sum(p.fold == f for p in manifest.pairs) for f in range(10)] == [600] * 10
    assert sum(p.same for p in manifest.pairs) == 3000
    first = manifest.pairs[0]
    assert (first.a, first.b, first.same, first.fold) == (
        "Abel_Pacheco__Abel_Pacheco_0001",
        "Abel_Pacheco__Abel_Pacheco_0004",
        True,
        0,
    )
