"""Backbone registry: every name builds, gives (N, D) at its image size, and the counts are right."""

from __future__ import annotations

import pytest
import torch

from trainer.backbones import available_backbones, build_backbone, register


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
