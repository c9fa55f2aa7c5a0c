"""Margin-softmax heads (CosFace, ArcFace, SphereFace, combined; SV-Softmax; focal term).

    from heads import MarginHead
    head = MarginHead(num_classes, embed_dim, margin="arcface", s=64, m=0.5, t=1.0, impl="auto")
    loss = head(embeddings, labels)                         # mean loss; raw (unnormalized) embeddings
    loss, acc = head(embeddings, labels, return_accuracy=True)
    head.last_accuracy                                      # 0-d tensor, detached, no host sync
    head.set_step(step)                                     # SphereFace's lambda annealing

`last_accuracy` (and the returned `acc`) is the fraction of rows whose target cosine is the
largest cosine, computed inside the pass without a B x C tensor.

impl: "reference" (plain PyTorch, B x C logits), "chunked" (PyTorch over blocks of classes),
"fused" (Triton; needs CUDA or TRITON_INTERPRET=1), "auto" (fused on CUDA, chunked elsewhere).
Margin options go as keyword arguments: sphereface `lambda_base, lambda_min, gamma, power`;
combined `m1, m2, m3`. `gamma_focal` > 0 adds the focal term. Inputs may be fp32, bf16 or fp16;
the head computes in fp32 (float64 inputs stay float64 in reference and chunked, for tests).
`block` (chunked only) is the number of classes per block. `operands` ("auto", "fp32", "bf16",
"fp16"): the dtype the class products read (auto: fp16 tensor-core operands on CUDA, fp32 on the
CPU; always fp32 accumulation; `heads.core.operand_dtype` says why fp16 rather than bf16).
`deterministic=True` (fused): no autotuning, fixed kernel configs, so results are bitwise equal
across processes; the default picks configs by timing (bitwise reproducible within a process,
possibly differing in the last bits between processes). No implementation uses atomics.

Memory per class (C x D weight, fp32 master): the weight (4 D bytes), its gradient (4 D bytes: the
buffer the engine writes becomes `weight.grad` without a copy when the optimizer zeroes with
`set_to_none=True`, PyTorch's default; otherwise autograd adds it into the existing gradient), and
the optimizer's state (SGD momentum: 4 D bytes). Working memory does not grow with C: chunked holds
a few B x block fp32 temporaries, fused 12 x B bytes per program forward and a B x chunk block (2
bytes each) plus a chunk of W in fp16 backward (see heads/fused.py). The reference holds several
B x C tensors.

The forward is kept out of `torch.compile` graphs (`torch.compiler.disable`): compile the backbone;
the head runs eagerly, so its Python-int training step (`set_step`) never becomes a Dynamo guard
that would recompile the graph at every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.chunked import ChunkedEngine
from heads.core import OPERANDS, head_rows
from heads.margins import DEFAULT_SCALE, Margin, build_margin
from heads.reference import focal, reference_forward

__all__ = ["MarginHead", "Margin", "build_margin"]

IMPLS = ("auto", "reference", "chunked", "fused")


def _make_engine(impl: str, block: int | None, deterministic: bool, operands: str):
    if impl == "chunked":
        return ChunkedEngine(block or 8192, operands=operands)
    from heads.fused import FusedEngine  # imports triton only when asked for

    # `block` sizes the chunked engine's class blocks; the kernels keep their own tiles
    return FusedEngine(deterministic=deterministic, operands=operands)


class MarginHead(nn.Module):
    def __init__(self, num_classes: int, embed_dim: int, margin: str = "cosface", s: float | None = None,
                 m: float | None = None, t: float = 1.0, impl: str = "auto", gamma_focal: float = 0.0,
                 block: int | None = None, deterministic: bool = False, operands: str = "auto",
                 **margin_kwargs: float) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}: expected one of {', '.join(IMPLS)}")
        if operands not in OPERANDS:
            raise ValueError(f"unknown operands {operands!r}: expected one of {', '.join(OPERANDS)}")
        if t < 1.0:
            raise ValueError(f"SV-Softmax t must be >= 1 (1 turns it off), got {t}")
        self.margin: Margin = build_margin(margin, m, **margin_kwargs)
        self.s = float(DEFAULT_SCALE[margin] if s is None else s)
        self.t = float(t)
        self.gamma_focal = float(gamma_focal)
        self.impl = impl
        self.block = block
        self.deterministic = deterministic
        self.operands = operands
        self.step = 0
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.normal_(self.weight, std=0.01)
        self.last_accuracy: Tensor | None = None
        self._engines: dict[str, object] = {}  # built once per implementation, on first use

    def set_step(self, step: int) -> None:
        """The training step, for margins that anneal with it (SphereFace)."""
        self.step = int(step)

    def resolved_impl(self, device: torch.device) -> str:
        if self.impl == "auto":
            return "fused" if device.type == "cuda" else "chunked"
        return self.impl

    def engine(self, impl: str):
        """The chunked or fused engine, made on first use and kept (the fused one records its kernels)."""
        if impl not in self._engines:
            self._engines[impl] = _make_engine(impl, self.block, self.deterministic, self.operands)
        return self._engines[impl]

    @torch.compiler.disable
    def forward(self, embeddings: Tensor, labels: Tensor, return_accuracy: bool = False):
        # the head computes in fp32 even inside the trainer's bf16/fp16 autocast region
        with torch.autocast(embeddings.device.type, enabled=False):
            return self._forward(embeddings, labels, return_accuracy)

    def _forward(self, embeddings: Tensor, labels: Tensor, return_accuracy: bool):
        labels = labels.long()
        impl = self.resolved_impl(embeddings.device)
        if impl == "reference":
            loss, acc = reference_forward(embeddings, self.weight, labels, self.margin, self.s, self.t,
                                          self.gamma_focal, self.step)
        else:
            dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
            xn = F.normalize(embeddings.to(dtype), dim=1)
            rows, correct = head_rows(xn, self.weight, labels, self.margin, self.step, self.s, self.t,
                                      self.engine(impl))
            loss, acc = focal(rows, self.gamma_focal).mean(), correct.mean()
        self.last_accuracy = acc.detach()
        return (loss, self.last_accuracy) if return_accuracy else loss

    def extra_repr(self) -> str:
        C, D = self.weight.shape
        return (f"classes={C}, dim={D}, margin={self.margin.name}, s={self.s}, t={self.t}, "
                f"impl={self.impl}, focal={self.gamma_focal}")
