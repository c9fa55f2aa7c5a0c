"""The algorithm shared by the chunked and fused implementations, minus the class loop.

Forward: gather the B target cosines, apply the margin to them (any margin), then let an
engine sweep the classes for the log-sum-exp over the non-target logits and the best
non-target cosine. Backward: the engine sweeps the classes again, recomputing each block of
cosines, and accumulates dX and dW (the target column's gradient enters as a given vector).
Nothing of size B x C is ever held; the engine decides the block size.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from heads.margins import Margin


class Engine(Protocol):
    def forward(self, xn: Tensor, weight: Tensor, rw: Tensor, labels: Tensor, thr: Tensor,
                s: float, t: float) -> tuple[Tensor, Tensor]:
        """(log-sum-exp over the non-target logits, max non-target cosine), both (B,) fp32."""
        ...

    def backward(self, xn: Tensor, weight: Tensor, rw: Tensor, labels: Tensor, thr: Tensor, lse: Tensor,
                 g: Tensor, dcy: Tensor, s: float, t: float) -> tuple[Tensor, Tensor]:
        """(dL/dxn (B x D), dL/dweight (C x D)) given g = dL/d(row loss) and dcy = dL/dc_y."""
        ...


def inv_norms(weight: Tensor) -> Tensor:
    # the reduction runs in fp32 (or float64) without a converted copy of the whole weight
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return 1.0 / torch.linalg.vector_norm(weight, dim=1, dtype=dtype).clamp_min(1e-12)


class _HeadFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xn: Tensor, weight: Tensor, labels: Tensor, margin: Margin, step: int, s: float,
                t: float, engine: Engine) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        rw = inv_norms(weight)
        c_y = (xn * weight[labels].to(xn.dtype)).sum(1) * rw[labels].to(xn.dtype)
        psi = margin.psi(c_y, step)
        lse_other, max_other = engine.forward(xn, weight, rw, labels, psi, s, t)
        tgt = s * psi
        lse = torch.logaddexp(lse_other.to(xn.dtype), tgt)
        ctx.save_for_backward(xn, weight, labels, rw, c_y, psi, lse)
        ctx.margin, ctx.step, ctx.s, ctx.t, ctx.engine = margin, step, s, t, engine
        correct = (c_y >= max_other.to(xn.dtype)).to(xn.dtype)
        ctx.mark_non_differentiable(correct)
        return lse - tgt, correct

    @staticmethod
    def backward(ctx, g: Tensor, _g_correct: Tensor):  # type: ignore[override]
        xn, weight, labels, rw, c_y, psi, lse = ctx.saved_tensors
        s = ctx.s
        p_y = torch.exp(s * psi - lse)
        dcy = g * (p_y - 1.0) * s * ctx.margin.dpsi(c_y, ctx.step)
        # backward may run on a thread with autocast on; the head's contract is fp32
        with torch.autocast(xn.device.type, enabled=False):
            dxn, dw = ctx.engine.backward(xn, weight, rw, labels, psi, lse, g, dcy, s, ctx.t)
        return dxn, dw.to(weight.dtype), None, None, None, None, None, None


def head_rows(xn: Tensor, weight: Tensor, labels: Tensor, margin: Margin, step: int, s: float, t: float,
              engine: Engine) -> tuple[Tensor, Tensor]:
    """(per-row loss, per-row 1.0 where the target cosine is the largest) through `engine`."""
    return _HeadFn.apply(xn, weight, labels, margin, step, s, t, engine)
