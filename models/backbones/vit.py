"""The face vision transformer (ViT-T/S/B/L) of the large-scale face-recognition results.

The design of arcface_torch's face ViT (the open WebFace42M ViT results), with its parameter names
so its weights can be imported later: a 9x9 stride-9 patch embedding (112x112 -> 12x12 = 144 tokens;
the last 4 rows and columns are not seen), a learned position embedding, pre-norm blocks
(LayerNorm, multi-head self-attention without qkv bias, an MLP of ratio 4 with ReLU6) with
stochastic depth, a final LayerNorm, then no CLS token: all tokens flattened, a linear layer and
BN to `width`, a linear layer and BN to the embedding. Attention is
`scaled_dot_product_attention`, whose kernels keep the softmax in fp32 under bf16 autocast (the
reference computes it in fp32 by hand for the same reason).

Training-only regularizers, both off in eval: drop path (per-sample dropping of a block's
residual branch, rate rising linearly with depth to `drop_path`) and patch masking: a random
`mask_ratio` of the tokens is left out of the blocks (cheaper steps too) and a learned mask token
(a parameter only when mask_ratio > 0) stands in for them before the flattening head.
`checkpointing=True` recomputes each block in the backward pass (activation checkpointing) to
train the large variants with less memory.

Scaling kwargs (config `model.kwargs`): width, depth, heads, mlp_ratio, patch, drop_path,
mask_ratio, checkpointing. The registered sizes and their defaults are in VARIANTS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.backbones.common import check_positive
from models.backbones.registry import register

# name: (width, depth), 8 heads each; drop path and mask ratio of the published WebFace42M runs
# (arcface_torch: vit_t_dp005_mask0, vit_s_dp005_mask_0, vit_b_dp005_mask_005, vit_l_dp005_mask_005).
VARIANTS = {
    "vit_t": {"width": 256, "depth": 12, "drop_path": 0.05, "mask_ratio": 0.0},
    "vit_s": {"width": 512, "depth": 12, "drop_path": 0.05, "mask_ratio": 0.0},
    "vit_b": {"width": 512, "depth": 24, "drop_path": 0.05, "mask_ratio": 0.05},
    "vit_l": {"width": 768, "depth": 24, "drop_path": 0.05, "mask_ratio": 0.05},
}
BN_EPS = 2e-5  # the face-recognition feature layers' BN epsilon


class DropPath(nn.Module):
    """Zeroes the whole residual branch of a random `rate` of the samples in training, scaling the
    rest by 1 / (1 - rate) so the expectation is unchanged; the identity in eval."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        keep = 1 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, width = x.shape
        q, k, v = self.qkv(x).view(n, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, tokens, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)), each branch drop-pathed."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, tokens, width)


class FaceViT(nn.Module):
    def __init__(
        self,
        embedding_size: int = 512,
        image_size: tuple[int, int] = (112, 112),
        width: int = 256,
        depth: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        patch: int = 9,
        drop_path: float = 0.0,
        mask_ratio: float = 0.0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_positive(width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio, patch=patch)
        if width % heads:
            raise ValueError(f"width must be a multiple of heads, got width {width} and heads {heads}")
        if not 0 <= drop_path < 1 or not 0 <= mask_ratio < 1:
            raise ValueError(f"drop_path and mask_ratio must be in [0, 1), got {drop_path}, {mask_ratio}")
        grid = (image_size[0] // patch, image_size[1] // patch)
        if min(grid) < 1:
            raise ValueError(f"patch {patch} is larger than the image {list(image_size)}")
        self.tokens = grid[0] * grid[1]
        if int(self.tokens * (1 - mask_ratio)) < 1:
            raise ValueError(f"mask_ratio {mask_ratio} masks all {self.tokens} tokens")
        self.mask_ratio, self.checkpointing = float(mask_ratio), bool(checkpointing)
        self.patch_embed = PatchEmbed(patch, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.tokens, width))
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # deeper blocks dropped more
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(width)
        # Only with masking: a parameter without a gradient would stop DDP (find_unused_parameters off).
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width)) if mask_ratio > 0 else None
        self.feature = nn.Sequential(
            nn.Linear(width * self.tokens, width, bias=False),
            nn.BatchNorm1d(width, eps=BN_EPS),
            nn.Linear(width, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=BN_EPS),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters the optimizer leaves undecayed besides norms and biases (trainer/optim.py)."""
        return {"pos_embed", "mask_token"}

    def _kept_tokens(self, n: int, device: torch.device) -> torch.Tensor:
        """(n, kept) indices of the tokens each sample keeps: a random subset per sample."""
        kept = int(self.tokens * (1 - self.mask_ratio))
        return torch.rand(n, self.tokens, device=device).argsort(dim=1)[:, :kept]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        masking = self.training and self.mask_token is not None
        if masking:
            keep = self._kept_tokens(x.shape[0], x.device)[..., None].expand(-1, -1, x.shape[2])
            x = x.gather(1, keep)
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        if masking:  # the dropped tokens' places get the learned mask token
            full = self.mask_token.to(x.dtype).expand(x.shape[0], self.tokens, x.shape[2])
            x = full.scatter(1, keep, x)
        return self.feature(x.flatten(1))


def _make(name: str):  # noqa: ANN202 - a registry factory
    def factory(embedding_size: int = 512, image_size: tuple[int, int] = (112, 112), **kwargs: object):
        return FaceViT(embedding_size, image_size, **{**VARIANTS[name], **kwargs})  # type: ignore[arg-type]

    return factory


for _name in VARIANTS:
    register(_name)(_make(_name))
