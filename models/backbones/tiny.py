"""A small, fast backbone for CPU demos and tests.

Stride-2 stem (112 -> 56) so the expensive layers see small maps, then depthwise-separable
conv-BN-PReLU blocks (stride 2 three times, 56 -> 7), a GDC output and a BN'ed embedding.
About 0.1 GFLOP-class work at 112x112 and ~0.2 M parameters: trains in minutes on 2 cores.
"""

from __future__ import annotations

import torch
from torch import nn

from models.backbones.common import GDCEmbedding, check_positive, conv_bn, downsampled, init_weights
from models.backbones.registry import register


def _dw_sep(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin), conv_bn(cin, cout, 1, 1))


class TinyNet(nn.Module):
    def __init__(
        self,
        embedding_size: int = 128,
        image_size: tuple[int, int] = (112, 112),
        width: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive(width=width)
        w = int(width)
        self.stem = conv_bn(3, w, 3, 2)
        self.blocks = nn.Sequential(
            _dw_sep(w, 2 * w, 2),
            _dw_sep(2 * w, 2 * w, 1),
            _dw_sep(2 * w, 4 * w, 2),
            _dw_sep(4 * w, 4 * w, 1),
            _dw_sep(4 * w, 8 * w, 2),
        )
        spatial = (downsampled(image_size[0], 4), downsampled(image_size[1], 4))
        self.head = GDCEmbedding(8 * w, spatial, embedding_size, dropout)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@register("tiny")
def tiny(embedding_size: int = 128, image_size: tuple[int, int] = (112, 112), **kwargs: object) -> nn.Module:
    return TinyNet(embedding_size, image_size, **kwargs)  # type: ignore[arg-type]
