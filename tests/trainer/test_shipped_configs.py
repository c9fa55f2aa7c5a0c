"""Every shipped config (configs/*.yaml, globbed: a new one is covered) loads as shipped, builds its
backbone at full size, and trains two steps at reduced size on the CPU with its own recipe: the same
backbone family, margin, head options (Partial FC sample rate, parallel mode), optimizer and schedule.
Only what the CPU cannot hold changes: synthetic data, the backbone's width and depth, batch 8,
fp32, no compile. The warning for a ViT trained with SGD is tested at the end."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from tests._trainer_util import ROOT, SHIPPED_CONFIGS, as_overrides, cpu_run, tiny_overrides
from trainer.config import TrainConfig, load_config, recipe_warnings
from trainer.engine import build_configured_backbone, train

# The shipped datasets' crop (preprocess/build_shards.py's default) for the full-size build.
FULL_SIZE = (112, 112)

# Each family's backbone at a CPU's size, by registry-name prefix (the full size is built on the
# meta device); a family not listed runs at its own size (on 32x32 images).
REDUCED_KWARGS = {
    "ir": {"width_mult": 0.125, "depths": [1, 1, 1, 1]},  # ResNet-IR: a block a stage, 8 to 64 channels
    "vit": {"width": 32, "depth": 2},  # 8 heads of 4, patch 9: 3x3 tokens
    "mobilefacenet": {"width_mult": 0.25},
    "tiny": {"width": 8},
}

BATCH = 8
# Partial FC samples max(rate x classes, batch) centres: 64 classes leave negatives to draw at 0.2.
CLASSES = 64


def reduced(shipped: TrainConfig, run_dir: Path) -> list[str]:
    """Overrides running `shipped` two steps on the CPU; its recipe stays (test below checks)."""
    values = {
        **cpu_run(run_dir, steps=2),
        "data.synthetic.classes": CLASSES,
        # one optimizer step is optim.accumulate micro-batches: enough images for two steps
        "data.synthetic.per_class": max(2, math.ceil(2 * BATCH * shipped.optim.accumulate / CLASSES)),
        "loader.batch_size": BATCH,
        "validation.lfw_shards": "null",
        "validation.sets": "{}",
        "logging.display": "none",
    }
    for key, value in reduced_kwargs(shipped.model.backbone).items():
        values[f"model.kwargs.{key}"] = value
    return as_overrides(values)


def reduced_kwargs(backbone: str) -> dict[str, object]:
    family = next((k for k in REDUCED_KWARGS if backbone.startswith(k)), None)
    return REDUCED_KWARGS.get(family, {})


@pytest.fixture
def one_thread():
    """Tensors this small gain nothing from threads, and on a loaded machine a second intra-op
    thread only waits for a core (this file ran several times slower with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FULL_SIZE_BUILT: dict[str, int] = {}  # a model section (repr) -> its parameter count


def full_size_parameters(cfg: TrainConfig) -> int:
    """The shipped backbone built at full size on the meta device (shapes only: no memory, no
    arithmetic), once per model section (several configs share one)."""
    key = repr(cfg.model)
    if key not in FULL_SIZE_BUILT:
        with torch.device("meta"):
            backbone = build_configured_backbone(cfg, FULL_SIZE)
        FULL_SIZE_BUILT[key] = sum(p.numel() for p in backbone.parameters())
    return FULL_SIZE_BUILT[key]


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_builds_and_trains_two_steps(path, tmp_path, one_thread):
    shipped = load_config(path)  # as shipped: an unknown key or a bad value fails here, in one line
    assert recipe_warnings(shipped) == [], "a shipped recipe follows the trainer's own advice"
    # the shipped model section builds as it is, whatever the reduced run below changes
    assert full_size_parameters(shipped) > 0

    small = load_config(path, reduced(shipped, tmp_path / "run"))
    # the recipe itself is untouched by the reduction
    assert (small.model.backbone, small.model.embedding_size) == (
        shipped.model.backbone,
        shipped.model.embedding_size,
    )
    assert small.head == shipped.head and small.optim == shipped.optim
    assert small.schedule == dataclasses.replace(shipped.schedule, steps=2)
    assert small.model.kwargs == {**shipped.model.kwargs, **reduced_kwargs(shipped.model.backbone)}

    summary = train(small)
    assert summary["step"] == 2 and summary["skipped_total"] == 0, summary
    assert summary["loss"] is not None and math.isfinite(summary["loss"]), summary
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_the_shipped_configs_are_the_published_recipes():
    """The arcface_torch figures each config aims at depend on these values (its configs/*.py)."""
    recipes = {
        # name: backbone, margin, m, weight decay, epochs, Partial FC sample rate
        "ms1mv3_r50": ("ir50", "arcface", 0.5, 5e-4, 20, 1.0),
        "ms1mv3_r100": ("ir100", "arcface", 0.5, 5e-4, 20, 1.0),
        "ms1mv3_mbf": ("insightface_mbf", "arcface", 0.5, 1e-4, 40, 1.0),
        "glint360k_r100": ("ir100", "cosface", 0.4, 1e-4, 20, 1.0),
        "webface4m_r100": ("ir100", "cosface", 0.4, 5e-4, 20, 1.0),
        "webface12m_r100": ("ir100", "cosface", 0.4, 5e-4, 20, 1.0),
        "webface42m_r100_pfc02": ("ir100", "cosface", 0.4, 5e-4, 20, 0.2),
    }
    for name, (backbone, margin, m, wd, epochs, rate) in recipes.items():
        path = ROOT / "configs" / f"{name}.yaml"
        cfg = load_config(path)
        got = (cfg.model.backbone, cfg.head.margin, cfg.head.m, cfg.optim.weight_decay, cfg.schedule.epochs)
        assert got == (backbone, margin, m, wd, epochs), name
        assert cfg.head.sample_rate == rate and (rate == 1.0 or cfg.head.parallel == "shard"), name
        assert (cfg.head.s, cfg.model.embedding_size, cfg.optim.name, cfg.optim.lr) == (64.0, 512, "sgd", 0.1)
        assert (cfg.optim.momentum, cfg.loader.batch_size, cfg.schedule.warmup_steps) == (0.9, 128, 0)
        assert (cfg.schedule.decay, cfg.schedule.power, cfg.optim.clip_grad_norm) == ("poly", 2.0, 5.0)
        text = path.read_text()
        assert "IJB-C TAR" in text and "build_shards.py" in text, f"{name}: the figure and the data command"


VIT_WARNING = "configs/webface42m_vit_b.yaml"


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_vit_with_sgd_gets_one_warning_line_naming_the_recipe(optimizer, tmp_path, capsys, one_thread):
    overrides = tiny_overrides(
        tmp_path / "run",
        steps=1,
        **{
            "model.backbone": "vit_t",
            "model.kwargs.width": 16,
            "model.kwargs.depth": 1,
            "optim.name": optimizer,
        },
    )
    cfg = load_config(None, overrides)
    assert train(cfg)["step"] == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if VIT_WARNING in line]
    if optimizer == "adamw":
        assert lines == []
        return
    assert len(lines) == 1 and lines[0].startswith("warning: model.backbone=vit_t with optim.name=sgd")
    assert "AdamW" in lines[0] and "warm-up" in lines[0]
    # a CNN with SGD is the common recipe: nothing to say
    assert recipe_warnings(load_config(None, tiny_overrides(tmp_path / "cnn"))) == []
