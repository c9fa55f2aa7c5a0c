"""A margin head's options, checked in one place, and the engine they choose.

`MarginHead` and `ShardedMarginHead` both take their options through `HeadOptions`, so an option
means the same in both and is validated once, when the head is built: a bad value is a ValueError
naming the option. A margin's own options (sphereface `lambda_base, lambda_min, gamma, power`;
combined `m1, m2, m3`; adaface `h, t_alpha`; magface `l_a, u_a, l_m, u_m, lambda_g`) are the
keyword arguments its class lists in `options` (heads/margins.py): a new margin registers there and
needs nothing here. `make_engine` is the one engine factory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from heads.chunked import ChunkedEngine
from heads.core import FUSED_DIM_MULTIPLE, OPERANDS, Engine
from heads.margins import DEFAULT_SCALE, Margin, build_margin

IMPLS = ("auto", "reference", "chunked", "fused")
DEFAULT_BLOCK = 8192  # classes per block of the chunked engine


@dataclass(frozen=True)
class HeadOptions:
    """What computes the loss: margin, scale s (None: the margin's default), m (None: its default),
    SV-Softmax t, implementation, focal gamma, chunked block, fused determinism, product operands,
    whether the fused forward keeps its B x C cosines for the backward (`save_logits`: 2 bytes per
    logit, the backward skips recomputing them), sub-centers per class (`subcenters`, K: sub-center
    ArcFace, any margin, every implementation), and the margin's own options (`margin_options`)."""

    margin: str = "cosface"
    s: float | None = None
    m: float | None = None
    t: float = 1.0
    impl: str = "auto"
    gamma_focal: float = 0.0
    block: int | None = None
    deterministic: bool = False
    operands: str = "auto"
    save_logits: bool = False
    subcenters: int = 1
    margin_options: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, **kwargs) -> HeadOptions:
        """The head constructors' keyword arguments: the fields above, anything else a margin option."""
        names = {f.name for f in fields(cls)} - {"margin_options"}
        own = {k: v for k, v in kwargs.items() if k in names}
        return cls(**own, margin_options={k: v for k, v in kwargs.items() if k not in names})

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"unknown impl {self.impl!r}: expected one of {', '.join(IMPLS)}")
        if self.operands not in OPERANDS:
            raise ValueError(f"unknown operands {self.operands!r}: expected one of {', '.join(OPERANDS)}")
        if self.t < 1.0:
            raise ValueError(f"SV-Softmax t must be >= 1 (1 turns it off), got {self.t}")
        if self.gamma_focal < 0.0:
            raise ValueError(f"gamma_focal must be >= 0 (0 turns the focal term off), got {self.gamma_focal}")
        if self.s is not None and self.s <= 0.0:
            raise ValueError(f"scale s must be positive, got {self.s}")
        if int(self.subcenters) != self.subcenters or self.subcenters < 1:
            raise ValueError(f"subcenters must be a positive integer, got {self.subcenters}")
        if self.block is not None and self.block < 1:
            raise ValueError(f"block (classes per chunked block) must be positive, got {self.block}")
        margin = self.build_margin()  # the margin's name, options and values, checked now, not at first use
        if self.t != 1.0 and type(margin).hard_t is not Margin.hard_t:
            raise ValueError(
                f"SV-Softmax t={self.t} and {margin.name} both change the hard negatives: "
                f"use t=1 with {margin.name}"
            )

    def build_margin(self) -> Margin:
        return build_margin(self.margin, self.m, **self.margin_options)

    @property
    def scale(self) -> float:
        return float(DEFAULT_SCALE[self.margin] if self.s is None else self.s)

    def resolved_impl(self, device: torch.device, dim: int | None = None) -> str:
        """impl, with auto resolved: fused on CUDA (for an embedding size `dim` the kernels take: a
        multiple of FUSED_DIM_MULTIPLE), chunked elsewhere."""
        if self.impl == "auto":
            fits = dim is None or dim % FUSED_DIM_MULTIPLE == 0
            return "fused" if device.type == "cuda" and fits else "chunked"
        return self.impl

    def make_engine(self, impl: str) -> Engine:
        """A new chunked or fused engine (`impl` resolved) with these options."""
        if impl == "chunked":
            return ChunkedEngine(
                self.block or DEFAULT_BLOCK, operands=self.operands, subcenters=int(self.subcenters)
            )
        if impl != "fused":
            raise ValueError(f"impl {impl!r} has no engine (expected chunked or fused)")
        from heads.fused import FusedEngine  # imports triton only when asked for

        # `block` sizes the chunked engine's class blocks; the kernels keep their own tiles
        return FusedEngine(
            deterministic=self.deterministic,
            operands=self.operands,
            save_logits=self.save_logits,
            subcenters=int(self.subcenters),
        )
