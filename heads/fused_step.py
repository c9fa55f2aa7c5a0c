"""The head's SGD step fused with the normalized copy of W its next forward reads: one Triton pass
(`_sgd_step_kernel`, launched by `sgd_step_normalized`; heads/head_sgd.py's `FusedHeadSGD` decides
where it runs).

torch.optim.SGD over the fp32 C x D head weight and its momentum makes four foreach passes (the
weight decay's temporary, the momentum's scale and add, the update: 44 bytes per element), and the
fused engine then reads W once more for Wn and the inverse norms (6 bytes): ~26 GB per step at
C = 1M, D = 512. The one pass (22 bytes per element) reads W, dW and the momentum, writes W and the
momentum as torch.optim.SGD does -- the same operations in the same order and roundings:
d = dW + wd W, m = mu m + (1 - dampening) d (m = d on the first step), d = d + mu m (Nesterov) or m,
W = W - lr d, each "a + alpha b" one fused multiply-add as in torch's kernels -- and from the new W,
still in registers, the inverse row norms and Wn in the engine's operand dtype (into the old Wn's
buffer). The engine adopts them for the new weight version, so the next forward makes no normalize
pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from heads.fused import FusedEngine, _on, normalize_block, triton

if triton is not None:
    import triton.language as tl

    from heads.fused import _inv_norms

    @triton.jit
    def _sgd_step_kernel(
        W,
        GRAD,
        SCALE,
        BUF,
        RW,
        WN,
        C,
        D,
        lr,
        wd,
        momentum,
        keep,
        SCALED: tl.constexpr,
        DECAY: tl.constexpr,
        MOMENTUM: tl.constexpr,
        FIRST: tl.constexpr,
        NESTEROV: tl.constexpr,
        BR: tl.constexpr,
        BD: tl.constexpr,
    ):
        # BR whole rows (BD >= D) a program, W, dW and the momentum contiguous (stride D); keep is
        # 1 - dampening; SCALED: dW times the 0-d SCALE first (the clip's factor, as its in-place
        # multiply would). torch's "a.add(b, alpha=x)" is one fma(b, x, a) on the CPU and the GPU.
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        rmask = rows < C
        ds = tl.arange(0, BD)
        m = rmask[:, None] & (ds < D)[None, :]
        at = rows.to(tl.int64)[:, None] * D + ds[None, :]
        w = tl.load(W + at, mask=m, other=0.0)
        d = tl.load(GRAD + at, mask=m, other=0.0).to(tl.float32)  # fp32 or bf16 (weight.grad_dtype)
        if SCALED:
            d = d * tl.load(SCALE)
        if DECAY:
            d = tl.fma(w, wd, d)
        if MOMENTUM:
            if FIRST:
                buf = d
            else:
                buf = tl.fma(d, keep, tl.load(BUF + at, mask=m, other=0.0) * momentum)
            tl.store(BUF + at, buf, mask=m)
            if NESTEROV:
                d = tl.fma(buf, momentum, d)
            else:
                d = buf
        w = tl.fma(d, -lr, w)
        tl.store(W + at, w, mask=m)
        r = _inv_norms(w, BR)
        tl.store(RW + rows, r, mask=rmask)
        tl.store(WN + at, (w * r[:, None]).to(WN.dtype.element_ty), mask=m)


STEP_WARPS = 8  # three fp32 rows of 8192 elements a block: 96 registers a thread


def sgd_step_normalized(
    weight: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    engine: FusedEngine,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    first: bool,
    grad_scale: Tensor | None = None,
) -> None:
    """One SGD step of `weight` in place (and of `momentum_buffer`, written whole when `first`) with
    the gradient times `grad_scale` (a 0-d fp32 tensor on the device; None: 1), handing the engine
    the new weight's inverse norms and Wn. The three C x D tensors contiguous, the weight and the
    momentum fp32, the gradient fp32 or bf16 (weight.grad_dtype)."""
    C, D = weight.shape
    op = engine.operand_dtype(weight)
    wn = engine.spare_normalized(weight.shape, op, weight.device)
    wn = torch.empty((C, D), dtype=op, device=weight.device) if wn is None else wn
    rw = torch.empty(C, device=weight.device)
    buf = weight if momentum_buffer is None else momentum_buffer  # not read without momentum
    br, bd = normalize_block(D)
    with _on(weight.device):
        _sgd_step_kernel[(triton.cdiv(C, br),)](
            weight,
            grad,
            grad if grad_scale is None else grad_scale,  # not read unless SCALED
            buf,
            rw,
            wn,
            C,
            D,
            float(lr),
            float(weight_decay),
            float(momentum),
            1.0 - float(dampening),
            SCALED=grad_scale is not None,
            DECAY=weight_decay != 0,
            MOMENTUM=momentum != 0,
            FIRST=first,
            NESTEROV=bool(nesterov),
            BR=br,
            BD=bd,
            num_warps=STEP_WARPS,
        )
    # the kernel wrote W behind autograd's back: a new version, so whatever is keyed on the old one
    # (a graph that saved W, the engine's saved cosines) sees the change
    torch.autograd.graph.increment_version(weight)
    engine.adopt(weight, rw, wn)
