"""Real LFW (../shared/data/lfw, skipped when absent): an InsightFace-layout .bin made from the aligned
LFW shards, imported, scores what the shards score with a model nobody here trained."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from eval.import_bin import main as import_main
from eval.verification.shard_faces import read_jpeg, shard_jpegs
from eval.verify import main as verify_main
from preprocess.build_shards import main as build_main
from shards.manifest import load_manifest

LFW = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lfw"
REFERENCE = LFW.parent / "reference" / "mobilefacenet_112x96_casia.ckpt"
pytestmark = [
    pytest.mark.skipif(
        not (LFW / "pairs.txt").is_file() or not (LFW / "lfw").is_dir(),
        reason=f"real LFW (lfw/ and pairs.txt) not found in {LFW}",
    ),
    pytest.mark.skipif(not REFERENCE.is_file(), reason=f"the reference MobileFaceNet is not at {REFERENCE}"),
]


@pytest.mark.slow
def test_lfw_bin_scores_what_the_lfw_shards_score(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Slow: a 112x96 build of all LFW (~10 s), a 12,000-image pack, and the reference MobileFaceNet
    over 7,701 + 12,000 faces without flip (~2-3 min on 2 idle cores)."""
    from eval.import_mobilefacenet import main as mfn_main

    shards = tmp_path / "lfw"
    assert build_main(["lfw", "--root", str(LFW), "--out", str(shards), "--image-size", "112x96"]) == 0
    m = load_manifest(shards)
    where = shard_jpegs(m)
    # The published layout: images 2i and 2i+1 are pair i, in pairs.txt order; a Python 2 style pickle.
    images = [read_jpeg(where[k]) for p in m.pairs for k in (p.a, p.b)]
    pack = tmp_path / "lfw.bin"
    pack.write_bytes(pickle.dumps((images, [p.same for p in m.pairs]), protocol=2))
    assert import_main(["--bin", str(pack), "--out", str(tmp_path / "lfw_bin")]) == 0
    ckpt = tmp_path / "reference.pt"
    assert mfn_main(["--source", str(REFERENCE), "--out", str(ckpt), "--image-size", "112x96"]) == 0
    out = tmp_path / "m.json"
    code = verify_main(
        [
            "--checkpoint",
            str(ckpt),
            "--sets",
            f"lfw={shards}",
            f"lfw_bin={tmp_path / 'lfw_bin'}",
            "--no-flip",
            "--batch-size",
            "32",
            "--json",
            str(out),
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    sets = json.loads(out.read_text())["sets"]
    assert sets["lfw"]["num_pairs"] == sets["lfw_bin"]["num_pairs"] == 6000
    assert sets["lfw_bin"]["num_faces"] == 12000 and sets["lfw"]["num_faces"] < 8000
    assert sets["lfw"]["accuracy_mean"] >= 0.98, sets["lfw"]
    assert abs(sets["lfw"]["accuracy_mean"] - sets["lfw_bin"]["accuracy_mean"]) <= 0.001, sets
