"""Triton kernels for the blocked algorithm: cosines by blocked dot products in fp32, online
log-sum-exp, SV re-weighting and the target column inside the tile, and a backward pass that
recomputes the tiles and accumulates dX and dW. No B x C tensor is ever allocated.

Work split: program p owns a contiguous range of class tiles and sweeps every batch tile for
each of them. It alone writes its dW rows and its slice of the per-program partials (the
forward's running max / sum / best cosine per row, the backward's dX partial), so there are
no atomics and results are bitwise deterministic for a given tile configuration; the partials
are combined on the host side in a fixed order. The W tile is re-read from L2 across the
batch tiles, so W streams from memory once per pass.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with the CUDA and CPU stacks
    triton = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _on(device: torch.device):
    # Triton launches on the *current* CUDA device; tensors on another one (cuda:1 without
    # torch.cuda.set_device) would be read by a kernel running on the wrong GPU.
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


if triton is not None:

    @triton.jit
    def _cos_tile(X, W, RW, rows, cols, rmask, cmask, D, stride_x, stride_w,
                  BB: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
        acc = tl.zeros((BB, BC), dtype=tl.float32)
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            dmask = ds < D
            x = tl.load(X + rows[:, None] * stride_x + ds[None, :], mask=rmask[:, None] & dmask[None, :],
                        other=0.0).to(tl.float32)
            # cast before the dot: the interpreter's bf16 dot is wrong, and we want fp32 accumulation
            w = tl.load(W + cols[:, None] * stride_w + ds[None, :], mask=cmask[:, None] & dmask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.dot(x, tl.trans(w), input_precision=PREC)
        rw = tl.load(RW + cols, mask=cmask, other=0.0)
        return acc * rw[None, :]

    @triton.jit
    def _fwd_kernel(X, W, RW, LAB, THR, M, L, MX, B, C, D, stride_x, stride_w, tiles_per_prog, s, t,
                    HARD: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
                    PREC: tl.constexpr):
        pid = tl.program_id(0)
        for i in range(0, tiles_per_prog):
            # int64: row offsets cols * stride_w pass 2^31 (int32 wraps) once C * D >= 2^31
            cols = ((pid * tiles_per_prog + i) * BC + tl.arange(0, BC)).to(tl.int64)
            cmask = cols < C
            for b0 in range(0, B, BB):
                rows = b0 + tl.arange(0, BB)
                rmask = rows < B
                cos = _cos_tile(X, W, RW, rows, cols, rmask, cmask, D, stride_x, stride_w, BB, BC, BD, PREC)
                lab = tl.load(LAB + rows, mask=rmask, other=-1)
                logit = s * cos
                if HARD:
                    thr = tl.load(THR + rows, mask=rmask, other=0.0)
                    logit = tl.where(cos > thr[:, None], s * (t * cos + (t - 1.0)), logit)
                valid = cmask[None, :] & (cols[None, :] != lab[:, None])
                logit = tl.where(valid, logit, float("-inf"))
                off = pid * B + rows
                m_old = tl.load(M + off, mask=rmask, other=-1e30)
                l_old = tl.load(L + off, mask=rmask, other=0.0)
                mx_old = tl.load(MX + off, mask=rmask, other=-2.0)
                m_new = tl.maximum(m_old, tl.max(logit, axis=1))
                l_new = l_old * tl.exp(m_old - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), axis=1)
                mx_new = tl.maximum(mx_old, tl.max(tl.where(valid, cos, -2.0), axis=1))
                tl.store(M + off, m_new, mask=rmask)
                tl.store(L + off, l_new, mask=rmask)
                tl.store(MX + off, mx_new, mask=rmask)

    @triton.jit
    def _bwd_kernel(X, W, RW, LAB, THR, LSE, G, DCY, DXP, DW, B, C, D, stride_x, stride_w, tiles_per_prog,
                    s, t, HARD: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
                    PREC: tl.constexpr):
        pid = tl.program_id(0)
        for i in range(0, tiles_per_prog):
            cols = ((pid * tiles_per_prog + i) * BC + tl.arange(0, BC)).to(tl.int64)  # as above
            cmask = cols < C
            rw = tl.load(RW + cols, mask=cmask, other=0.0)
            h = tl.zeros((BC,), dtype=tl.float32)
            for b0 in range(0, B, BB):
                rows = b0 + tl.arange(0, BB)
                rmask = rows < B
                cos = _cos_tile(X, W, RW, rows, cols, rmask, cmask, D, stride_x, stride_w, BB, BC, BD, PREC)
                lab = tl.load(LAB + rows, mask=rmask, other=-1)
                lse = tl.load(LSE + rows, mask=rmask, other=0.0)
                g = tl.load(G + rows, mask=rmask, other=0.0)
                dcy = tl.load(DCY + rows, mask=rmask, other=0.0)
                logit = s * cos
                scale = tl.zeros((BB, BC), dtype=tl.float32) + (s * g)[:, None]
                if HARD:
                    thr = tl.load(THR + rows, mask=rmask, other=0.0)
                    hard = cos > thr[:, None]
                    logit = tl.where(hard, s * (t * cos + (t - 1.0)), logit)
                    scale = tl.where(hard, scale * t, scale)
                dc = tl.exp(logit - lse[:, None]) * scale
                dc = tl.where(cols[None, :] == lab[:, None], dcy[:, None], dc)
                dc = tl.where(rmask[:, None] & cmask[None, :], dc, 0.0)
                h += tl.sum(dc * cos, axis=0)
                dcr = dc * rw[None, :]
                for d0 in range(0, D, BD):
                    ds = d0 + tl.arange(0, BD)
                    dmask = ds < D
                    xm = rmask[:, None] & dmask[None, :]
                    wm = cmask[:, None] & dmask[None, :]
                    x = tl.load(X + rows[:, None] * stride_x + ds[None, :], mask=xm, other=0.0).to(tl.float32)
                    w = tl.load(W + cols[:, None] * stride_w + ds[None, :], mask=wm, other=0.0).to(tl.float32)
                    pdx = DXP + pid.to(tl.int64) * B * D + rows[:, None] * D + ds[None, :]
                    tl.store(pdx, tl.load(pdx, mask=xm, other=0.0) + tl.dot(dcr, w, input_precision=PREC),
                             mask=xm)
                    pdw = DW + cols[:, None] * D + ds[None, :]
                    tl.store(pdw, tl.load(pdw, mask=wm, other=0.0)
                             + tl.dot(tl.trans(dc), x, input_precision=PREC), mask=wm)
            # d c_ij / d w_j = r_j (xn_i - c_ij r_j w_j): apply the normalization's projection
            for d0 in range(0, D, BD):
                ds = d0 + tl.arange(0, BD)
                wm = cmask[:, None] & (ds < D)[None, :]
                w = tl.load(W + cols[:, None] * stride_w + ds[None, :], mask=wm, other=0.0).to(tl.float32)
                pdw = DW + cols[:, None] * D + ds[None, :]
                gw = tl.load(pdw, mask=wm, other=0.0)
                tl.store(pdw, rw[:, None] * gw - (rw * rw * h)[:, None] * w, mask=wm)


class FusedEngine:
    """Launches the kernels. `deterministic` is accepted for the API: these kernels use no atomics,
    so they are always deterministic. `precision` is tl.dot's input precision for fp32 ("ieee" exact,
    "tf32" faster on GPUs with a ~1e-3 relative error on the cosines)."""

    def __init__(self, deterministic: bool = True, block_c: int | None = None, block_b: int | None = None,
                 block_d: int | None = None, precision: str = "ieee", programs: int | None = None) -> None:
        if triton is None:
            raise RuntimeError("impl='fused' needs triton; use impl='chunked'")
        self.deterministic = deterministic
        self.bc, self.bb, self.bd = block_c or 64, block_b or 64, block_d or 64
        self.precision = precision
        self.programs = programs

    def _check(self, t: Tensor) -> None:
        if t.device.type != "cuda" and not _interpreting():
            raise RuntimeError("impl='fused' needs a CUDA device, or TRITON_INTERPRET=1 set before triton "
                               "is imported; use impl='chunked' (or 'auto') on the CPU")
        if t.dtype == torch.float64:
            raise RuntimeError("impl='fused' computes in fp32; float64 is for the reference and chunked")

    def _grid(self, C: int, device: torch.device) -> tuple[int, int]:
        n_tiles = triton.cdiv(C, self.bc)
        if self.programs is not None:
            want = self.programs
        elif device.type == "cuda":
            want = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        else:
            want = 2
        per = triton.cdiv(n_tiles, min(want, n_tiles))
        return triton.cdiv(n_tiles, per), per

    def forward(self, xn: Tensor, weight: Tensor, rw: Tensor, labels: Tensor, thr: Tensor,
                s: float, t: float) -> tuple[Tensor, Tensor]:
        self._check(xn)
        xn, weight = xn.contiguous(), weight.contiguous()
        B, D = xn.shape
        C = weight.shape[0]
        n_prog, per = self._grid(C, xn.device)
        m = torch.full((n_prog, B), -1e30, device=xn.device)
        l_ = torch.zeros((n_prog, B), device=xn.device)
        mx = torch.full((n_prog, B), -2.0, device=xn.device)
        with _on(xn.device):
            _fwd_kernel[(n_prog,)](xn, weight, rw, labels, thr.float().contiguous(), m, l_, mx, B, C, D,
                                   xn.stride(0), weight.stride(0), per, float(s), float(t), HARD=t != 1.0,
                                   BB=self.bb, BC=self.bc, BD=self.bd, PREC=self.precision)
        top = m.amax(0)
        lse = top + torch.log((l_ * torch.exp(m - top)).sum(0))
        return lse, mx.amax(0)

    def backward(self, xn: Tensor, weight: Tensor, rw: Tensor, labels: Tensor, thr: Tensor, lse: Tensor,
                 g: Tensor, dcy: Tensor, s: float, t: float) -> tuple[Tensor, Tensor]:
        xn, weight = xn.contiguous(), weight.contiguous()
        B, D = xn.shape
        C = weight.shape[0]
        n_prog, per = self._grid(C, xn.device)
        dxp = torch.zeros((n_prog, B, D), device=xn.device)
        dw = torch.zeros((C, D), device=xn.device)
        with _on(xn.device):
            _bwd_kernel[(n_prog,)](xn, weight, rw, labels, thr.float().contiguous(),
                                   lse.float().contiguous(), g.float().contiguous(),
                                   dcy.float().contiguous(), dxp, dw, B, C, D, xn.stride(0),
                                   weight.stride(0), per, float(s), float(t), HARD=t != 1.0,
                                   BB=self.bb, BC=self.bc, BD=self.bd, PREC=self.precision)
        return dxp.sum(0), dw
