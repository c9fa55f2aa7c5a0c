"""Real LFW (../shared/data/lfw, skipped when absent): an InsightFace-layout .bin made from the aligned
LFW shards, imported, scores what the shards score with a model nobody here trained."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from eval import import_bin
from eval.verification.shard_faces import read_jpeg, shard_jpegs
from eval.verify import main as verify_main
from shards.manifest import load_manifest
from tests._real_lfw import LFW, REFERENCE

pytestmark = [
    pytest.mark.skipif(
        not (LFW / "pairs.txt").is_file() or not (LFW / "lfw").is_dir(),
        reason=f"real LFW (lfw/ and pairs.txt) not found in {LFW}",
    ),
    pytest.mark.skipif(not REFERENCE.is_file(), reason=f"the reference MobileFaceNet is not at {REFERENCE}"),
]

# Every 6th genuine and every 6th impostor pair of each of View 2's 10 folds: 1,000 pairs in the same
# 10 folds, spread over the alphabet as the whole set is (the reference scores 98.9% on them, 98.8%
# on all 6,000 pairs, which test_lfw_real.py scores).
STRIDE = 6


@pytest.mark.slow
def test_lfw_bin_scores_what_the_lfw_shards_score(
    reference_lfw: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1,000 of the View 2 pairs as a pack and as a pairs file over the shards. Slow: the reference
    MobileFaceNet over ~1,600 + 2,000 faces without flip (~35 s on 2 cores), plus the fixture's
    build of all LFW if it runs first."""
    shards, ckpt = reference_lfw
    m = load_manifest(shards)
    lines = (LFW / "pairs.txt").read_text().splitlines()
    folds, per_kind = (int(v) for v in lines[0].split())
    assert len(m.pairs) == folds * 2 * per_kind  # the manifest's pairs are pairs.txt's, in its order
    kept = range(0, per_kind, STRIDE)
    keep = [(f * 2 + kind) * per_kind + i for f in range(folds) for kind in (0, 1) for i in kept]
    pairs = [m.pairs[i] for i in keep]
    assert [(p.fold, p.same) for p in pairs] == [
        (f, kind == 0) for f in range(folds) for kind in (0, 1) for _ in kept
    ]
    subset = tmp_path / "pairs.txt"
    subset.write_text("\n".join([f"{folds}\t{len(kept)}", *(lines[1 + i] for i in keep)]) + "\n")
    where = shard_jpegs(m)
    # The published layout: images 2i and 2i+1 are pair i, in pairs.txt order; a Python 2 style pickle.
    images = [read_jpeg(where[k]) for p in pairs for k in (p.a, p.b)]
    pack = tmp_path / "lfw.bin"
    pack.write_bytes(pickle.dumps((images, [p.same for p in pairs]), protocol=2))
    monkeypatch.setattr(import_bin, "SAMPLES_PER_SHARD", 800)  # several shards, as a full-size pack has
    assert import_bin.main(["--bin", str(pack), "--out", str(tmp_path / "lfw_bin")]) == 0
    assert len(load_manifest(tmp_path / "lfw_bin").shards) == 3
    out = tmp_path / "m.json"
    code = verify_main(
        [
            "--checkpoint",
            str(ckpt),
            "--sets",
            f"lfw={shards}",
            f"lfw_bin={tmp_path / 'lfw_bin'}",
            "--pairs",
            f"lfw={subset}",
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
    assert sets["lfw"]["num_pairs"] == sets["lfw_bin"]["num_pairs"] == len(pairs)
    assert len(sets["lfw"]["fold_accuracies"]) == len(sets["lfw_bin"]["fold_accuracies"]) == folds
    # the shards embed each face the pairs name once; the pack holds one image per pair side
    assert sets["lfw_bin"]["num_faces"] == len(images)
    assert sets["lfw"]["num_faces"] == len({k for p in pairs for k in (p.a, p.b)}) < len(images)
    assert sets["lfw"]["accuracy_mean"] >= 0.98, sets["lfw"]
    assert abs(sets["lfw"]["accuracy_mean"] - sets["lfw_bin"]["accuracy_mean"]) <= 0.001, sets
