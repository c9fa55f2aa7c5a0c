"""MobileFaceNet (Chen et al., 2018): inverted residual bottlenecks, PReLU, linear GDC output.

`se=True` adds squeeze-and-excitation to every bottleneck, as the reference project's variant did.
Table 1 of the paper: conv3x3/2 64, dw3x3 64, bottlenecks (t, c, n, s) = (2,64,5,2), (4,128,1,2),
(2,128,6,1), (4,128,1,2), (2,128,2,1), conv1x1 512, linear GDC 7x7, linear conv1x1 -> embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from models.backbones.common import (
    GDCEmbedding,
    SqueezeExcite,
    check_positive,
    conv_bn,
    downsampled,
    init_weights,
)
from models.backbones.registry import register


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int, se: bool) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = [
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
        ]
        if se:
            layers.append(SqueezeExcite(hidden))
        layers.append(conv_bn(hidden, cout, 1, act=False))  # linear bottleneck: no activation
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


SETTINGS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class MobileFaceNet(nn.Module):
    def __init__(self, embedding_size: int = 128, image_size: tuple[int, int] = (112, 112),
                 se: bool = False, width_mult: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        check_positive(width_mult=width_mult)
        c = lambda v: max(8, int(round(v * width_mult)))  # noqa: E731
        self.stem = nn.Sequential(conv_bn(3, c(64), 3, 2), conv_bn(c(64), c(64), 3, 1, groups=c(64)))
        blocks: list[nn.Module] = []
        cin = c(64)
        for t, ch, n, s in SETTINGS:
            for i in range(n):
                blocks.append(Bottleneck(cin, c(ch), s if i == 0 else 1, t, se))
                cin = c(ch)
        self.blocks = nn.Sequential(*blocks)
        self.expand = conv_bn(cin, 512, 1)
        spatial = (downsampled(image_size[0], 4), downsampled(image_size[1], 4))
        self.head = GDCEmbedding(512, spatial, embedding_size, dropout)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.expand(self.blocks(self.stem(x))))


@register("mobilefacenet")
def mobilefacenet(embedding_size: int = 128, image_size: tuple[int, int] = (112, 112),
                  **kwargs: object) -> nn.Module:
    return MobileFaceNet(embedding_size, image_size, **kwargs)  # type: ignore[arg-type]


@register("mobilefacenet_se")
def mobilefacenet_se(embedding_size: int = 128, image_size: tuple[int, int] = (112, 112),
                     **kwargs: object) -> nn.Module:
    kwargs.setdefault("se", True)
    return MobileFaceNet(embedding_size, image_size, **kwargs)  # type: ignore[arg-type]
