"""The blocked algorithm in PyTorch: classes in blocks, memory bounded by the block, not by C.

For CPU training and wherever Triton cannot run. Each block's cosines are recomputed in the
backward pass instead of being saved.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ChunkedEngine:
    def __init__(self, block: int = 8192) -> None:
        self.block = int(block)

    def _logits(self, cos: Tensor, thr: Tensor, s: float, t: float) -> tuple[Tensor, Tensor | None]:
        if t == 1.0:
            return s * cos, None
        hard = cos > thr[:, None]
        return torch.where(hard, s * (t * cos + (t - 1.0)), s * cos), hard

    def _block_cos(self, xn: Tensor, weight: Tensor, rw: Tensor, c0: int, c1: int) -> Tensor:
        w = weight[c0:c1].to(xn.dtype)
        return (xn @ w.t()) * rw[c0:c1].to(xn.dtype)

    def forward(self, xn: Tensor, weight: Tensor, rw: Tensor, labels: Tensor, thr: Tensor,
                s: float, t: float) -> tuple[Tensor, Tensor]:
        B, C = xn.shape[0], weight.shape[0]
        lses, maxes = [], []
        rows = torch.arange(B, device=xn.device)
        for c0 in range(0, C, self.block):
            c1 = min(C, c0 + self.block)
            cos = self._block_cos(xn, weight, rw, c0, c1)
            logits, _ = self._logits(cos, thr, s, t)
            inside = (labels >= c0) & (labels < c1)
            r, col = rows[inside], labels[inside] - c0
            logits[r, col] = float("-inf")  # the target column is handled outside
            cos[r, col] = -2.0
            lses.append(torch.logsumexp(logits, dim=1))
            maxes.append(cos.amax(dim=1))
        return torch.logsumexp(torch.stack(lses), 0), torch.stack(maxes).amax(0)

    def backward(self, xn: Tensor, weight: Tensor, rw: Tensor, labels: Tensor, thr: Tensor, lse: Tensor,
                 g: Tensor, dcy: Tensor, s: float, t: float) -> tuple[Tensor, Tensor]:
        B, C = xn.shape[0], weight.shape[0]
        dxn = torch.zeros_like(xn)
        dw = torch.empty(weight.shape, dtype=xn.dtype, device=weight.device)
        rows = torch.arange(B, device=xn.device)
        for c0 in range(0, C, self.block):
            c1 = min(C, c0 + self.block)
            cos = self._block_cos(xn, weight, rw, c0, c1)
            logits, hard = self._logits(cos, thr, s, t)
            dc = torch.exp(logits - lse[:, None])
            dc *= (g * s)[:, None]
            if hard is not None:
                dc = torch.where(hard, dc * t, dc)
            inside = (labels >= c0) & (labels < c1)
            dc[rows[inside], labels[inside] - c0] = dcy[inside]
            w = weight[c0:c1].to(xn.dtype)
            r = rw[c0:c1].to(xn.dtype)
            dxn += (dc * r) @ w
            # d c_ij / d w_j = r_j (xn_i - c_ij r_j w_j): the projection of the normalization
            h = (dc * cos).sum(0)
            dwb = dc.t() @ xn
            dwb *= r[:, None]
            dwb -= (r * r * h)[:, None] * w
            dw[c0:c1] = dwb
        return dxn, dw
