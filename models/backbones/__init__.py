"""Backbone registry: name -> constructor of an embedding network.

Every backbone takes float32 NCHW RGB normalized as `(pixel / 255 - 0.5) / 0.5` at `image_size`
and returns (N, embedding_size) embeddings, not normalized. Modules register themselves with
`@register("name")`; `build_backbone` looks the name up. Adding a backbone: its module here with
`@register`, its import on the line below, and a row in tests/models/test_backbones.py.
"""

from __future__ import annotations

# Importing the modules fills the registry.
from models.backbones import iresnet, mobilefacenet, tiny, vit  # noqa: F401
from models.backbones.registry import available_backbones, build_backbone, register

__all__ = ["available_backbones", "build_backbone", "register"]
