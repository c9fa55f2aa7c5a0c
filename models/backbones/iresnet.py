"""ResNet-IR ("improved residual", the iResNet family of face recognition) 18/34/50/100/200, and
`ir_small` for little compute.

Pre-activation-style basic blocks BN-conv-BN-PReLU-conv(stride)-BN with a projection shortcut,
a stride-1 3x3 stem (`stem_stride=2` halves the map first: about a quarter of the work, for little
compute), four stages of 64/128/256/512 channels each halving the map (112 -> 7),
then BN, dropout, flatten, a fully connected layer and BN to the embedding.

Scaling kwargs (config `model.kwargs`): `width_mult` multiplies every stage's channels (stage i has
round(width * width_mult) * 2**i, at least 8), `depths` gives the blocks per stage (four
positive integers) in place of the named depth's, `stem_stride` (1 or 2) is the stem's stride.
`ir_small` is IR-18 at a quarter of the width: ~1.0 M parameters at a 128-d embedding, trainable
on a 2-core CPU. `fixed_feature_scale=True` keeps the embedding BatchNorm's scale at 1.0, untrained,
as InsightFace's arcface_torch does: the layers, their order and this option make their released
r18-r200 weights load as they are (eval/import_insightface.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.backbones.common import downsampled, init_weights
from models.backbones.registry import register

DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6)}


class IRBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def _stage_plan(
    depth: int, depths: Sequence[int] | None, width: int, width_mult: float
) -> list[tuple[int, int]]:
    """(channels, blocks) per stage; ValueError naming the kwarg for a value that cannot build."""
    if depths is None:
        if depth not in DEPTHS:
            raise ValueError(f"ResNet-IR depth must be one of {sorted(DEPTHS)}, not {depth}")
        depths = DEPTHS[depth]
    if len(depths) != 4 or not all(isinstance(n, int) and n >= 1 for n in depths):
        raise ValueError(f"depths must be four positive integers (blocks per stage), got {list(depths)}")
    if not (isinstance(width, int) and width >= 1) or not width_mult > 0:
        raise ValueError(
            f"width must be a positive integer and width_mult positive, got {width}, {width_mult}"
        )
    base = max(8, round(width * width_mult))
    return [(base * 2**i, n) for i, n in enumerate(depths)]


class IResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        embedding_size: int = 512,
        image_size: tuple[int, int] = (112, 112),
        dropout: float = 0.0,
        width: int = 64,
        width_mult: float = 1.0,
        depths: Sequence[int] | None = None,
        stem_stride: int = 1,
        fixed_feature_scale: bool = False,
    ) -> None:
        super().__init__()
        plan = _stage_plan(depth, depths, width, width_mult)
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        width = plan[0][0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width)
        )
        stages: list[nn.Module] = []
        cin = width
        for cout, n in plan:
            stages += [IRBlock(cin, cout, 2)] + [IRBlock(cout, cout, 1) for _ in range(n - 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        halvings = 4 + (stem_stride == 2)
        h, w = downsampled(image_size[0], halvings), downsampled(image_size[1], halvings)
        self.out_bn = nn.BatchNorm2d(cin)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(cin * h * w, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        init_weights(self)
        if fixed_feature_scale:
            self.features.weight.requires_grad_(False)  # stays 1.0: the optimizer skips it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.out_bn(self.stages(self.stem(x)))
        return self.features(self.fc(self.drop(x.flatten(1))))


def _make(depth: int, **defaults: object):  # noqa: ANN202 - a registry factory
    def factory(embedding_size: int = 512, image_size: tuple[int, int] = (112, 112), **kwargs: object):
        return IResNet(depth, embedding_size, image_size, **{**defaults, **kwargs})  # type: ignore[arg-type]

    return factory


for _depth in DEPTHS:
    register(f"ir{_depth}")(_make(_depth))
register("ir_small")(_make(18, width_mult=0.25))
