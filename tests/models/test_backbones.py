"""Backbone registry: every name builds, gives (N, D) at its image size, and the counts are right."""

from __future__ import annotations

import pytest
import torch

from models.backbones import available_backbones, build_backbone, register


def test_registry_lists_the_families():
    names = set(available_backbones())
    assert {"tiny", "mobilefacenet", "mobilefacenet_se", "ir18", "ir34", "ir50", "ir100"} <= names


@pytest.mark.parametrize("name", ["tiny", "mobilefacenet", "mobilefacenet_se", "ir18"])
def test_output_shape_and_size(name):
    model = build_backbone(name, embedding_size=96, image_size=(112, 112)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 96)
    assert torch.isfinite(out).all()


def test_parameter_counts_match_the_published_sizes():
    # MobileFaceNet: ~0.99 M parameters (paper, 128-d); IR-50 at 512-d: ~43.6 M (iResNet-50).
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 0.9e6 < count(build_backbone("mobilefacenet", 128)) < 1.1e6
    assert 43e6 < count(build_backbone("ir50", 512)) < 44.5e6


def test_other_image_sizes_and_channels_last():
    model = build_backbone("tiny", embedding_size=32, image_size=(32, 32)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a = model(x)
        b = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert a.shape == (3, 32)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_unknown_name_and_duplicate_registration():
    with pytest.raises(KeyError, match="available"):
        build_backbone("resnet9000")
    with pytest.raises(ValueError, match="twice"):
        register("tiny")(lambda **kw: None)


def test_iresnet_width_multiplier_and_depth_per_stage():
    model = build_backbone("ir18", 64, (32, 32), width_mult=0.5, depths=[1, 2, 1, 1])
    convs = [m for m in model.stages.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(model.stages) == 5  # blocks: 1 + 2 + 1 + 1
    assert sorted({c.out_channels for c in convs}) == [32, 64, 128, 256]
    assert build_backbone("ir18", 64, (32, 32), width_mult=0.5)(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    for bad, fragment in (
        ({"width_mult": 0}, "width_mult"),
        ({"depths": [2, 2]}, "depths"),
        ({"depths": [1, 0, 1, 1]}, "depths"),
        ({"width": 0}, "width"),
    ):
        with pytest.raises(ValueError, match=fragment):
            build_backbone("ir18", 64, (32, 32), **bad)


def test_ir_small_is_a_small_residual_net_that_trains(tmp_path):
    """IR-18 at a quarter width: ~1.5 M parameters at 128-d (IR-18: 14 M); 12 CPU steps at 32x32
    bring the loss down (a few seconds on an idle 2-core machine)."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    small = build_backbone("ir_small", 128)
    assert 0.3e6 < count(small) < 2e6
    assert count(small) < count(build_backbone("ir18", 128)) / 8
    from tests._trainer_util import metrics, tiny_overrides
    from trainer.config import load_config
    from trainer.engine import train

    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path / "run",
            steps=12,
            **{
                "model.backbone": "ir_small",
                "model.kwargs.width": 64,
                "logging.every_steps": 4,
                "checkpoint.every_steps": 100,
                "data.synthetic.noise": 0.3,
                "logging.tensorboard": "off",
            },
        ),
    )
    assert train(cfg)["step"] == 12
    rows = metrics(tmp_path / "run")
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], rows
