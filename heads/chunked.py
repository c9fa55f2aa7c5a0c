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

from heads.core import fix_target_terms, gradient_dtype, mm_f32, operand_dtype


class ChunkedEngine:
    """`block` classes per step; `subcenters` K: weight rows per class (sub-center ArcFace: a class's
    cosine is the max of its K rows', its gradient goes to that row alone)."""

    def __init__(self, block: int = 8192, operands: str = "auto", subcenters: int = 1) -> None:
        self.block = int(block)
        self.operands = operands
        self.subcenters = int(subcenters)

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

    def _class_cosines(self, cos: Tensor) -> tuple[Tensor, Tensor | None]:
        """(per-class cosines, the argmax sub-center of each, or None with one row per class)."""
        if self.subcenters == 1:
            return cos, None
        best = cos.view(cos.shape[0], -1, self.subcenters).max(2)
        return best.values, best.indices

    def _row_grad(self, dc: Tensor, arg: Tensor | None) -> Tensor:
        """The per-class gradient on the rows: each class's argmax sub-center takes it."""
        if arg is None:
            return dc
        rows = torch.zeros((*dc.shape, self.subcenters), dtype=dc.dtype, device=dc.device)
        return rows.scatter_(2, arg[:, :, None], dc[:, :, None]).view(dc.shape[0], -1)

    def forward(
        self, xn: Tensor, weight: Tensor, rw: Tensor, labels: Tensor, thr: Tensor, s: float, t: float | Tensor
    ) -> tuple[Tensor, Tensor]:
        K = self.subcenters
        C = weight.shape[0] // K
        lses, maxes = [], []
        for c0 in range(0, C, self.block):
            c1 = min(C, c0 + self.block)
            xo, wo = self._operands(xn, weight, c0 * K, c1 * K)
            cos, _ = self._class_cosines(mm_f32(xo, wo.t()).to(xn.dtype) * rw[c0 * K : c1 * K].to(xn.dtype))
            logits, _ = self._logits(cos, thr, s, t)
            target = _TargetColumn(labels, c0, c1)  # the target column is handled outside
            target.fill(logits, float("-inf"))
            target.fill(cos, -2.0)
            lses.append(torch.logsumexp(logits, dim=1))
            maxes.append(cos.amax(dim=1))
        return torch.logsumexp(torch.stack(lses), 0), torch.stack(maxes).amax(0)

    def backward(
        self,
        xn: Tensor,
        weight: Tensor,
        rw: Tensor,
        labels: Tensor,
        thr: Tensor,
        lse: Tensor,
        g: Tensor,
        dcy: Tensor,
        s: float,
        t: float | Tensor,
        target_rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        K = self.subcenters
        C = weight.shape[0] // K
        dxn = torch.zeros_like(xn)
        dw = torch.empty(weight.shape, dtype=gradient_dtype(weight), device=weight.device)
        target_rows = labels if target_rows is None else target_rows
        target_sub = target_rows - labels * K  # the sub-center each c_y came from
        for c0 in range(0, C, self.block):
            c1 = min(C, c0 + self.block)
            xo, wo = self._operands(xn, weight, c0 * K, c1 * K)
            r = rw[c0 * K : c1 * K].to(xn.dtype)
            cos_rows = mm_f32(xo, wo.t()).to(xn.dtype) * r
            cos, arg = self._class_cosines(cos_rows)
            logits, slope = self._logits(cos, thr, s, t)
            dc = torch.exp(logits - lse[:, None])
            dc *= (g * s)[:, None]
            if slope is not None:
                dc *= slope
            target = _TargetColumn(labels, c0, c1)
            target.fill(dc, dcy)
            if arg is not None:  # dc_y goes to the row c_y came from
                target.fill(arg, target_sub)
            dc = self._row_grad(dc, arg)
            # d c_ij / d w_j = r_j (xn_i - c_ij r_j w_j): the projection of the normalization
            h = (dc * cos_rows).sum(0)
            gx = (dc * r).to(xo.dtype)
            mm_f32(gx, wo, out=dxn)
            dwb = mm_f32(gx.t(), xo).to(xn.dtype)
            dwb -= (r * r * h)[:, None] * weight[c0 * K : c1 * K].to(xn.dtype)
            dw[c0 * K : c1 * K] = dwb
        xo = xn.to(operand_dtype(xn.device, xn.dtype, operands=self.operands))
        fix_target_terms(xn, xo, weight, rw, target_rows, dcy, dxn, dw)
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
