"""The blocked algorithm in PyTorch: classes in blocks, memory bounded by the block, not by C.

For CPU training and wherever Triton cannot run, and the honest GPU baseline for the fused kernels:
on CUDA its products are cuBLAS fp16 (tensor cores) with fp32 results (`heads.core.operand_dtype`).
Each block's cosines are recomputed in the backward pass instead of being saved. No shape depends
on the labels, so a step makes no host sync (the target column is written by gather/scatter).

Memory: beyond W and dW (C x D each), a few B x block fp32 temporaries and one block of W in the
operand dtype; nothing grows with C.
"""

from __future__ import annotations

import torch
from torch import Tensor

from heads.core import fix_target_terms, mm_f32, operand_dtype


class ChunkedEngine:
    def __init__(self, block: int = 8192, operands: str = "auto") -> None:
        self.block = int(block)
        self.operands = operands

    def _logits(self, cos: Tensor, thr: Tensor, s: float, t: float | Tensor) -> tuple[Tensor, Tensor | None]:
        """(logits, d logit / d(s cos) or None where it is 1 everywhere), as Engine.forward says."""
        if isinstance(t, Tensor):  # CurricularFace: s c (t + c) above the row's psi
            hard = cos > thr[:, None]
            return torch.where(hard, s * cos * (t + cos), s * cos), torch.where(hard, t + 2.0 * cos, 1.0)
        if t == 1.0:
            return s * cos, None
        hard = cos > thr[:, None]
        return torch.where(hard, s * (t * cos + (t - 1.0)), s * cos), 1.0 + (t - 1.0) * hard.to(cos.dtype)

    def _operands(self, xn: Tensor, weight: Tensor, c0: int, c1: int) -> tuple[Tensor, Tensor]:
        op = operand_dtype(xn.device, xn.dtype, operands=self.operands)
        return xn.to(op), weight[c0:c1].to(op)

    def forward(self, xn: Tensor, weight: Tensor, rw: Tensor, labels: Tensor, thr: Tensor,
                s: float, t: float | Tensor) -> tuple[Tensor, Tensor]:
        C = weight.shape[0]
        lses, maxes = [], []
        for c0 in range(0, C, self.block):
            c1 = min(C, c0 + self.block)
            xo, wo = self._operands(xn, weight, c0, c1)
            cos = mm_f32(xo, wo.t()).to(xn.dtype) * rw[c0:c1].to(xn.dtype)
            logits, _ = self._logits(cos, thr, s, t)
            target = _TargetColumn(labels, c0, c1)  # the target column is handled outside
            target.fill(logits, float("-inf"))
            target.fill(cos, -2.0)
            lses.append(torch.logsumexp(logits, dim=1))
            maxes.append(cos.amax(dim=1))
        return torch.logsumexp(torch.stack(lses), 0), torch.stack(maxes).amax(0)

    def backward(self, xn: Tensor, weight: Tensor, rw: Tensor, labels: Tensor, thr: Tensor, lse: Tensor,
                 g: Tensor, dcy: Tensor, s: float, t: float | Tensor) -> tuple[Tensor, Tensor]:
        C = weight.shape[0]
        dxn = torch.zeros_like(xn)
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        for c0 in range(0, C, self.block):
            c1 = min(C, c0 + self.block)
            xo, wo = self._operands(xn, weight, c0, c1)
            r = rw[c0:c1].to(xn.dtype)
            cos = mm_f32(xo, wo.t()).to(xn.dtype) * r
            logits, slope = self._logits(cos, thr, s, t)
            dc = torch.exp(logits - lse[:, None])
            dc *= (g * s)[:, None]
            if slope is not None:
                dc *= slope
            _TargetColumn(labels, c0, c1).fill(dc, dcy)
            # d c_ij / d w_j = r_j (xn_i - c_ij r_j w_j): the projection of the normalization
            h = (dc * cos).sum(0)
            gx = (dc * r).to(xo.dtype)
            mm_f32(gx, wo, out=dxn)
            dwb = mm_f32(gx.t(), xo).to(xn.dtype)
            dwb -= (r * r * h)[:, None] * weight[c0:c1].to(xn.dtype)
            dw[c0:c1] = dwb
        xo = xn.to(operand_dtype(xn.device, xn.dtype, operands=self.operands))
        fix_target_terms(xn, xo, weight, rw, labels, dcy, dxn, dw)
        return dxn, dw


class _TargetColumn:
    """Each row's target entry within the block of classes [c0, c1), for rows whose label is there.

    Shapes never depend on the labels (no boolean-mask indexing, which would wait for the GPU to
    count the rows): every row gathers one column, the label's if it is inside the block (else
    column 0), and writes back either the new value or the one it gathered."""

    def __init__(self, labels: Tensor, c0: int, c1: int) -> None:
        self.inside = ((labels >= c0) & (labels < c1))[:, None]
        self.col = (labels - c0).clamp(0, c1 - c0 - 1)[:, None]

    def fill(self, block: Tensor, value: Tensor | float) -> None:
        """block[i, label_i - c0] = value (value[i] for a tensor) for the rows whose label is inside."""
        if isinstance(value, Tensor):
            value = value.to(block.dtype)[:, None]
        block.scatter_(1, self.col, torch.where(self.inside, value, block.gather(1, self.col)))
