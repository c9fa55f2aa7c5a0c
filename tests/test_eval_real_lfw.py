"""eval/lfw.py on real LFW shards built from ../shared/data/lfw (skipped when that copy is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.lfw import main
from preprocess.build_shards import main as build_main
from trainer.backbones import build_backbone
from trainer.checkpoint import save_embedding_checkpoint

LFW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lfw"
pytestmark = pytest.mark.skipif(not (LFW / "pairs.txt").is_file() or not (LFW / "lfw").is_dir(),
                                reason=f"real LFW (lfw/ and pairs.txt) not found in {LFW}")


@pytest.fixture(scope="session")
def real_lfw_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole real LFW, built once per session into a temp folder (about 10 s on 2 cores)."""
    out = tmp_path_factory.mktemp("real_lfw") / "shards"
    assert build_main(["lfw", "--root", str(LFW), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_untrained_network_scores_near_chance_on_every_pair(real_lfw_shards: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Embeds all 13,232 real faces (~30 s of 2 cores without flip, plus the shard build): slow."""
    ckpt = tmp_path / "untrained.pt"
    model = build_backbone("tiny", 128, (112, 112))
    save_embedding_checkpoint(ckpt, {"backbone": "tiny", "embedding_size": 128, "image_size": [112, 112]},
                              model.state_dict())
    out = tmp_path / "metrics.json"
    code = main(["--checkpoint", str(ckpt), "--shards", str(real_lfw_shards), "--json", str(out),
                 "--no-flip", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    m = json.loads(out.read_text())
    assert m["num_pairs"] == 6000 and len(m["fold_accuracies"]) == 10
    # Untrained: low-level cues (pose, lighting) give a little above 0.5, far from a trained net's 0.99.
    assert 0.45 < m["accuracy_mean"] < 0.75, m
    assert 0.45 < m["auc"] < 0.8 and m["tar_at_far_1e-3"] < 0.1, m
    assert captured.out.startswith("LFW ACC: ")
