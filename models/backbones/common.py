"""Building blocks shared by the backbones."""

from __future__ import annotations

import torch
from torch import nn


def check_positive(**values: float) -> None:
    """ValueError naming the first size argument that is not positive (before torch warns about
    zero-element tensors and fails somewhere inside a layer)."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (no bias: BN follows) + BN [+ PReLU], padding keeps 'same' size at stride 1."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, s, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


def downsampled(size: int, times: int) -> int:
    """Spatial size after `times` stride-2 convs with padding 1 and kernel 3."""
    for _ in range(times):
        size = (size + 1) // 2
    return size


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.PReLU(hidden)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(w))))


class GDCEmbedding(nn.Module):
    """Global depthwise conv over the whole final map (keeps where a feature is, unlike avg pooling),
    then a linear projection and BN, as MobileFaceNet's 'linear GDC' output."""

    def __init__(self, channels: int, spatial: tuple[int, int], embedding_size: int, dropout: float = 0.0):
        super().__init__()
        self.gdc = nn.Conv2d(channels, channels, spatial, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj = nn.Linear(channels, embedding_size, bias=False)
        self.out_bn = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.gdc(x)).flatten(1)
        return self.out_bn(self.proj(self.drop(x)))


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
