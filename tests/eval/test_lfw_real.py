"""eval/lfw.py on real LFW shards built from ../shared/data/lfw (skipped when that copy is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.lfw import main
from models.backbones import build_backbone
from models.model_file import save_embedding_checkpoint
from preprocess.build_shards import main as build_main
from tests._real_lfw import LFW, REFERENCE

pytestmark = pytest.mark.skipif(
    not (LFW / "pairs.txt").is_file() or not (LFW / "lfw").is_dir(),
    reason=f"real LFW (lfw/ and pairs.txt) not found in {LFW}",
)


@pytest.fixture(scope="session")
def real_lfw_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole real LFW, built once per session into a temp folder (about 10 s on 2 cores)."""
    out = tmp_path_factory.mktemp("real_lfw") / "shards"
    assert build_main(["lfw", "--root", str(LFW), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_untrained_network_scores_near_chance_on_every_pair(
    real_lfw_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Embeds all 13,232 real faces (~30 s of 2 cores without flip, plus the shard build): slow."""
    ckpt = tmp_path / "untrained.pt"
    model = build_backbone("tiny", 128, (112, 112))
    save_embedding_checkpoint(
        ckpt, {"backbone": "tiny", "embedding_size": 128, "image_size": [112, 112]}, model.state_dict()
    )
    out = tmp_path / "metrics.json"
    code = main(
        [
            "--checkpoint",
            str(ckpt),
            "--shards",
            str(real_lfw_shards),
            "--json",
            str(out),
            "--no-flip",
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    m = json.loads(out.read_text())
    assert m["num_pairs"] == 6000 and len(m["fold_accuracies"]) == 10
    # Untrained: low-level cues (pose, lighting) give a little above 0.5, far from a trained net's 0.99.
    assert 0.45 < m["accuracy_mean"] < 0.75, m
    assert 0.45 < m["auc"] < 0.8 and m["tar_at_far_1e-3"] < 0.1, m
    assert captured.out.startswith("LFW ACC: ")


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE.is_file(), reason=f"the reference MobileFaceNet is not at {REFERENCE}")
def test_independently_trained_model_reaches_its_known_accuracy(
    reference_lfw: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole path on real faces with a model nobody here trained (CASIA-WebFace MobileFaceNet,
    known ~98.9% on these images; 98.77% here without flip): alignment at 112x96, shards, import
    (the session's `reference_lfw`), the 10-fold protocol.
    A wrong template, colour order or landmark order costs several points. Slow: 7,701 MobileFaceNet
    forwards (~40 s on 2 cores; flip TTA would double it), plus the fixture's build if it runs first."""
    shards, ckpt = reference_lfw
    out = tmp_path / "metrics.json"
    argv = ["--checkpoint", str(ckpt), "--shards", str(shards), "--json", str(out), "--quiet", "--no-flip"]
    argv += ["--batch-size", "32"]  # on 2 idle cores PyTorch embeds 1.6x faster than at the default 4
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    m = json.loads(out.read_text())
    assert m["num_pairs"] == 6000
    assert m["accuracy_mean"] >= 0.98, m
    assert m["auc"] >= 0.995, m


@pytest.mark.skipif(not REFERENCE.is_file(), reason=f"the reference MobileFaceNet is not at {REFERENCE}")
def test_import_rejects_a_size_that_does_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from common.cli import run_cli
    from eval.import_mobilefacenet import main as import_main

    argv = ["--source", str(REFERENCE), "--out", str(tmp_path / "x.pt"), "--image-size", "112"]
    code = run_cli(import_main, argv)
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "linear7.conv.weight" in err and "--image-size" in err
    assert not (tmp_path / "x.pt").exists()
