"""The whole chain on data it generates: synthetic photos -> aligned shards -> training -> LFW
protocol on identities the network never saw. Guards what `make demo` shows, at a smaller scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.cli import run_cli
from eval.lfw import main as lfw_main
from preprocess import synthetic
from preprocess.build_shards import main as build_main
from trainer.main import main as train_main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml"


def _accuracy(checkpoint: Path, shards: Path, out: Path) -> float:
    assert (
        run_cli(
            lfw_main,
            ["--checkpoint", str(checkpoint), "--shards", str(shards), "--json", str(out), "--quiet"],
        )
        == 0
    )
    return json.loads(out.read_text())["accuracy_mean"]


@pytest.mark.slow
def test_training_generalizes_to_unseen_identities(tmp_path: Path) -> None:
    """Slow (~45 s on 2 cores): 1,000 generated photos of 100 people, 80 training steps of the tiny
    backbone, then 760 LFW-protocol pairs of 40 other people (untrained 0.64 -> trained 0.955; 0.93
    after 60 steps, 0.97 after 120)."""
    raw, shards, run = tmp_path / "raw", tmp_path / "shards", tmp_path / "run"
    assert (
        synthetic.main(
            [
                "--out",
                str(raw),
                "--identities",
                "100",
                "--images-per-identity",
                "10",
                "--lfw-identities",
                "40",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    for dataset, out in (("vggface2", "train"), ("lfw", "lfw")):
        assert run_cli(build_main, [dataset, "--root", str(raw / dataset), "--out", str(shards / out)]) == 0
    overrides = [
        f"data.train_shards={shards / 'train'}",
        "validation.lfw_shards=null",
        f"run.dir={run}",
        "schedule.steps=80",
        "schedule.epochs=0",
        "schedule.warmup_steps=15",
        "logging.display=none",
        "logging.tensorboard=off",
        "checkpoint.every_steps=1000",
    ]
    assert train_main(["--config", str(CONFIG), *overrides]) == 0
    before = _accuracy(run / "checkpoints" / "untrained.pt", shards / "lfw", tmp_path / "before.json")
    after = _accuracy(run / "checkpoints" / "last.pt", shards / "lfw", tmp_path / "after.json")
    assert before < 0.75, before  # the generator is not trivially separable
    print(f"LFW-protocol accuracy on unseen identities: untrained {before:.4f} -> trained {after:.4f}")
    assert after > 0.85 and after - before > 0.2, (before, after)
