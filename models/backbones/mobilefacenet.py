"""MobileFaceNet (Chen et al., 2018): inverted residual bottlenecks, PReLU, linear GDC output.

`se=True` adds squeeze-and-excitation to every bottleneck, as the reference project's variant did.
Table 1 of the paper: conv3x3/2 64, dw3x3 64, bottlenecks (t, c, n, s) = (2,64,5,2), (4,128,1,2),
(2,128,6,1), (4,128,1,2), (2,128,2,1), conv1x1 512, linear GDC 7x7, linear conv1x1 -> embedding.

`insightface_mbf` is InsightFace arcface_torch's "mbf" (their `blocks`, `scale` arguments): the same
layers in another plan (channels 64*scale / 128*scale, bottleneck widths 128/256/512 whatever the
scale, a grouped (64 groups) rather than depthwise second stem conv), so their released weights load
into it (eval/import_insightface.py).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    def __init__(self, cin: int, cout: int, stride: int, hidden: int, se: bool) -> None:
        super().__init__()
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

Plan = list[tuple[int, int, int]]  # per bottleneck: (hidden channels, out channels, stride)


class MobileFaceNet(nn.Module):
    """Stem (conv3x3/2, grouped conv3x3), the planned bottlenecks, conv1x1 to 512, linear GDC."""

    def __init__(
        self,
        stem: int,
        stem_groups: int,
        plan: Plan,
        embedding_size: int,
        image_size: tuple[int, int],
        se: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, stem, 3, 2), conv_bn(stem, stem, 3, 1, groups=stem_groups))
        blocks: list[nn.Module] = []
        cin = stem
        for hidden, cout, stride in plan:
            blocks.append(Bottleneck(cin, cout, stride, hidden, se))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.expand = conv_bn(cin, 512, 1)
        spatial = (downsampled(image_size[0], 4), downsampled(image_size[1], 4))
        self.head = GDCEmbedding(512, spatial, embedding_size, dropout)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.expand(self.blocks(self.stem(x))))


def paper_plan(width_mult: float) -> tuple[int, Plan]:
    """(stem channels, plan) of the paper's Table 1, every width times `width_mult` (at least 8)."""
    check_positive(width_mult=width_mult)
    c = lambda v: max(8, int(round(v * width_mult)))  # noqa: E731
    plan, cin = [], c(64)
    for t, ch, n, s in SETTINGS:
        for i in range(n):
            plan.append((cin * t, c(ch), s if i == 0 else 1))
            cin = c(ch)
    return c(64), plan


def insightface_plan(blocks: Sequence[int], scale: int) -> Plan:
    """arcface_torch's plan: after the stem, a stride-2 bottleneck then blocks[i] stride-1 ones, three
    times. Their blocks[0] > 1 (mbf_large) swaps the stem's second conv for bottlenecks: not built."""
    if len(blocks) != 4 or blocks[0] != 1 or not all(isinstance(n, int) and n >= 0 for n in blocks):
        raise ValueError(f"blocks must be four non-negative integers starting with 1, got {list(blocks)}")
    check_positive(scale=scale)
    c1, c2 = 64 * scale, 128 * scale
    plan = []
    for (hidden, cout), (res_hidden, n) in zip(
        ((128, c1), (256, c2), (512, c2)), ((128, blocks[1]), (256, blocks[2]), (256, blocks[3]))
    ):
        plan += [(hidden, cout, 2)] + [(res_hidden, cout, 1)] * n
    return plan


@register("mobilefacenet")
def mobilefacenet(
    embedding_size: int = 128,
    image_size: tuple[int, int] = (112, 112),
    se: bool = False,
    width_mult: float = 1.0,
    dropout: float = 0.0,
) -> nn.Module:
    stem, plan = paper_plan(width_mult)
    return MobileFaceNet(stem, stem, plan, embedding_size, image_size, se, dropout)


@register("mobilefacenet_se")
def mobilefacenet_se(
    embedding_size: int = 128,
    image_size: tuple[int, int] = (112, 112),
    se: bool = True,
    width_mult: float = 1.0,
    dropout: float = 0.0,
) -> nn.Module:
    return mobilefacenet(embedding_size, image_size, se, width_mult, dropout)


@register("insightface_mbf")
def insightface_mbf(
    embedding_size: int = 512,
    image_size: tuple[int, int] = (112, 112),
    blocks: Sequence[int] = (1, 4, 6, 2),
    scale: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    return MobileFaceNet(
        64 * scale, 64, insightface_plan(blocks, scale), embedding_size, image_size, dropout=dropout
    )
