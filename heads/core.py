"""The algorithm shared by the chunked and fused implementations, minus the class loop.

Forward: gather the B target cosines, apply the margin to them (any margin), then let an
engine sweep the classes for the log-sum-exp over the non-target logits and the best
non-target cosine. Backward: the engine sweeps the classes again, recomputing each block of
cosines, and accumulates dX and dW (the target column's gradient enters as a given vector).
Nothing of size B x C is ever held (unless the fused engine is asked to save its cosines
for the backward); the engine decides the block size.

Also here: which dtype the class products take their operands in (`operand_dtype`), one rule for
both engines, and the product with an fp32 result that they use.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch
from torch import Tensor

from heads.margins import Margin


class Engine(Protocol):
    subcenters: int  # K: the weight holds K rows per class (sub-center ArcFace), a class's cosine their max

    def forward(
        self, xn: Tensor, weight: Tensor, rw: Tensor, labels: Tensor, thr: Tensor, s: float, t: float | Tensor
    ) -> tuple[Tensor, Tensor]:
        """(log-sum-exp over the non-target logits, max non-target cosine), both (B,) fp32.
        Non-target logits are s c, except where c > thr (the row's psi): s (t c + t - 1) for a float
        t > 1 (SV-Softmax), s c (t + c) for a 0-d tensor t (CurricularFace)."""
        ...

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
        """(dL/dxn (B x D), dL/dweight (C x D) in `gradient_dtype(weight)`) given g = dL/d(row
        loss), dcy = dL/dc_y. `target_rows`: the row of weight each c_y came from (`target_cosines`;
        -1 for a sharded head's rows another rank owns), which takes dcy; None: the labels (one row
        per class).
        The dW returned becomes weight.grad as it is (no copy), so engines allocate it once, C x D."""
        ...


# the fused kernels read X, Wn and write dW through tensor descriptors (TMA on Hopper), whose rows must
# be whole 16-byte units: 8 elements of the 16-bit operands (heads.options' "auto" picks chunked else)
FUSED_DIM_MULTIPLE = 8
OPERANDS = ("auto", "fp32", "bf16", "fp16")
_NAMED = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# torch >= 2.10: a parameter may keep its gradient in another dtype (`grad_dtype`)
GRAD_DTYPE_SUPPORTED = hasattr(torch.nn.Parameter(torch.zeros(1)), "grad_dtype")


def gradient_dtype(weight: Tensor) -> torch.dtype:
    """The dtype autograd keeps weight.grad in: torch's `grad_dtype` where it is set (a bf16 gradient of
    the fp32 head weight halves the backward's largest write, C x D; heads/head_sgd.py's step reads
    it), else weight's own. Engines write dW in it, so autograd takes their buffer without a cast. A
    non-leaf (Partial FC's sampled rows) has none: its gradient flows on to heads.sharded.select_rows,
    which builds the leaf's gradient in the leaf's gradient dtype."""
    return (weight.is_leaf and getattr(weight, "grad_dtype", None)) or weight.dtype


def operand_dtype(
    device: torch.device, dtype: torch.dtype, interpreting: bool = False, operands: str = "auto"
) -> torch.dtype:
    """The dtype the B x C products read their operands in; they always accumulate in fp32 (or float64).

    float64 stays float64 (the tests' exact path). On CUDA: fp16, the tensor cores at the bf16 rate
    with 3 more mantissa bits; the head's operands are unit vectors, weights and bounded gradients,
    well inside fp16's range (weights with elements beyond 65504 would need "bf16"). Measured on
    the CPU with the same numerics: fp16 operands' error equals the reference's own error on
    fp16-rounded inputs, while bf16's rounding of the backward's dL/dcos adds ~6e-3 (relative) to
    dW at s=64. On the CPU, and in Triton's interpreter (whose bf16 dot returns garbage): fp32.
    `operands` other than "auto" forces one ("fp32" for exact GPU runs, "bf16" for bf16's range).
    """
    if operands not in OPERANDS:
        raise ValueError(f"unknown operands {operands!r}: expected one of {', '.join(OPERANDS)}")
    if dtype == torch.float64:
        return torch.float64
    if operands != "auto":
        return _NAMED[operands]
    if device.type != "cuda" or interpreting:
        return torch.float32
    return torch.float16


def mm_f32(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ b with an fp32 (or float64) result; low-precision operands accumulate in fp32 in cuBLAS.

    With `out` given, the product is added into it (out += a @ b): one cuBLAS call accumulating into
    the fp32 `out` where torch.addmm(out_dtype=float32) takes an fp32 `out` with 16-bit operands (some
    torch versions ask for the operands' dtype), else the product and an add."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b) if out is None else out.addmm_(a, b)
    if out is not None and _runs("mm", a.device, a.dtype) and _runs("addmm", a.device, a.dtype):
        return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    prod = _low_precision_mm(a, b)
    return prod if out is None else out.add_(prod)


# per (op, device type, operand dtype): whether torch.mm(..., out_dtype=float32), or torch.addmm(acc,
# ..., out_dtype=float32, out=acc) into an fp32 accumulator, runs there (probed once)
_CAPABLE: dict[tuple[str, str, torch.dtype], bool] = {}


def _low_precision_mm(a: Tensor, b: Tensor) -> Tensor:
    """bf16/fp16 operands, fp32 result, as the tensor cores give it (exact products, fp32 sums):
    `out_dtype` where PyTorch has it (CUDA, torch >= 2.8), else the operands widened to fp32 (the
    CPU's bf16 product would round its result to bf16; a slower product beats a wrong one). Only the
    capability probe decides the fallback: an error of the real product (out of memory, a bad shape)
    propagates, and the next call takes the fast path again."""
    if _runs("mm", a.device, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _probe_mm(one: Tensor) -> None:
    torch.mm(one, one, out_dtype=torch.float32)


def _probe_addmm(one: Tensor) -> None:
    acc = torch.zeros(1, 1, device=one.device)
    torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)


# each probe, and what its "no" costs (said once in a RuntimeWarning)
_PROBES = {
    "mm": (_probe_mm, "the class products widen their operands to fp32 instead (same result, slower)"),
    "addmm": (_probe_addmm, "a product into an fp32 sum is a product and an add (same result)"),
}


def _runs(op: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Probe torch.<op>(out_dtype=float32) once per (device type, dtype) with a 1 x 1 product; say
    once when the answer is no."""
    probe, otherwise = _PROBES[op]
    key = (op, device.type, dtype)
    if key not in _CAPABLE:
        try:
            probe(torch.ones(1, 1, dtype=dtype, device=device))
            _CAPABLE[key] = True
        except torch.OutOfMemoryError:
            raise  # says nothing about the capability
        except (TypeError, NotImplementedError, RuntimeError) as err:
            # TypeError: torch < 2.8 has no out_dtype; NotImplementedError: no kernel for this
            # device (the CPU); RuntimeError: this dtype/device combination refused
            _CAPABLE[key] = False
            warnings.warn(
                f"heads: torch.{op}(out_dtype=float32) does not run for {dtype} on {device.type} "
                f"({type(err).__name__}); {otherwise}",
                RuntimeWarning,
                stacklevel=3,
            )
    return _CAPABLE[key]


def fix_target_terms(
    xn: Tensor,
    xo: Tensor,
    weight: Tensor,
    rw: Tensor,
    labels: Tensor,
    dcy: Tensor,
    dx: Tensor,
    dw: Tensor,
    normalized: bool = False,
) -> None:
    """Make the target column's share of dX and dW exact after low-precision products.

    The engines' products read G = dL/dcos * r rounded to the operand dtype; the target entry
    G_iy = dcy_i r_y is each row's largest gradient by far, so its rounding (up to 2^-9 in bf16)
    would dominate the error. Add (exact - rounded) for those B entries: rows of dX directly, rows
    of dW summed per class by a same-class product (no scatter-add, so still deterministic).
    `normalized=True` (the fused engine): the products read G = dL/dcos and the rows w r, both
    rounded, and dW's rows are scaled by r after the product. `labels` index rows of `weight` (with
    sub-centers: the target's sub-center row).
    """
    if xo.dtype in (torch.float32, torch.float64):
        return
    # A sharded head passes -1 for rows another rank owns: they get no target terms, and they
    # write the same value as a row this rank owns (duplicate indices must agree), without a sync.
    own = labels >= 0
    labels = torch.where(own, labels, labels.amax())  # the largest label is an owned one (if any)
    r_y = rw[labels].to(torch.float32)
    g = dcy.to(torch.float32) * r_y * own
    w_y = weight[labels].float()
    if normalized:
        g_low = (dcy.to(torch.float32) * own).to(xo.dtype).float()
        dx += g[:, None] * w_y - g_low[:, None] * (w_y * r_y[:, None]).to(xo.dtype).float()
        g_low = g_low * r_y
    else:
        g_low = g.to(xo.dtype).float()
        dx += g[:, None] * w_y - g_low[:, None] * w_y.to(xo.dtype).float()
    rows = g[:, None] * xn.float() - g_low[:, None] * xo.float()
    # each row gets the sum over the rows of its class, so rows of one class write the same value:
    # no host sync (torch.unique) and no scatter-add
    same = (labels[:, None] == labels[None, :]).to(torch.float32)
    dw[labels] = (dw[labels].float() + same @ rows).to(dw.dtype)


def inv_norms(weight: Tensor) -> Tensor:
    # the reduction runs in fp32 (or float64) without a converted copy of the whole weight
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return 1.0 / torch.linalg.vector_norm(weight, dim=1, dtype=dtype).clamp_min(1e-12)


def engine_inv_norms(engine: Engine, weight: Tensor) -> Tensor:
    """1 / |w_j| for a head's forward: an engine that makes its own copy of W (fused) supplies them from
    the same pass, so W is read once; otherwise computed here."""
    return getattr(engine, "inv_norms", inv_norms)(weight)


def subcenter_rows(classes: Tensor, subcenters: int) -> Tensor:
    """(N, K): the rows of weight that hold each class's K sub-centers (class j's rows j K .. j K + K - 1)."""
    return classes[:, None] * subcenters + torch.arange(subcenters, device=classes.device)


def target_cosines(
    xn: Tensor, weight: Tensor, rw: Tensor, labels: Tensor, subcenters: int = 1
) -> tuple[Tensor, Tensor]:
    """(c_y, the row of weight it comes from): each row's cosine with its class; with K sub-centers
    (class j's rows j K .. j K + K - 1 of weight) the largest of its class's K cosines and its row,
    the first on ties as torch's max (autograd-free: the engines route dc_y to that row)."""
    if subcenters == 1:
        return (xn * weight[labels].to(xn.dtype)).sum(1) * rw[labels].to(xn.dtype), labels
    rows = subcenter_rows(labels, subcenters)
    cands = (xn[:, None, :] * weight[rows].to(xn.dtype)).sum(2) * rw[rows].to(xn.dtype)
    best = cands.max(1)
    return best.values, labels * subcenters + best.indices


def target_terms(
    margin: Margin,
    c_y: Tensor,
    norms: Tensor | None,
    state: dict[str, Tensor],
    training: bool,
    step: int,
    t: float,
) -> tuple[Tensor | None, Tensor, float | Tensor]:
    """(psi's per-row parameter p, psi(c_y), what the engines take as t): the margin's running state
    moves first (training); CurricularFace hands the engines its t (a 0-d tensor, copied: a second
    forward before this backward may move the state) in place of SV-Softmax's float."""
    p = margin.rows(c_y, norms, state, training)
    hard = margin.hard_t(state)
    return p, margin.psi(c_y, step, p), (t if hard is None else hard.detach().to(c_y.dtype).clone())


class _HeadFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        xn: Tensor,
        weight: Tensor,
        labels: Tensor,
        norms: Tensor | None,
        margin: Margin,
        step: int,
        s: float,
        t: float,
        engine: Engine,
        state: dict[str, Tensor],
        training: bool,
    ) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        rw = engine_inv_norms(engine, weight)
        c_y, rows = target_cosines(xn, weight, rw, labels, engine.subcenters)
        p, psi, t = target_terms(margin, c_y, norms, state, training, step, t)
        lse_other, max_other = engine.forward(xn, weight, rw, labels, psi, s, t)
        tgt = s * psi
        lse = torch.logaddexp(lse_other.to(xn.dtype), tgt)
        ctx.save_for_backward(xn, weight, labels, rw, c_y, psi, lse, p, rows)
        ctx.margin, ctx.step, ctx.s, ctx.t, ctx.engine = margin, step, s, t, engine
        correct = (c_y >= max_other.to(xn.dtype)).to(xn.dtype)
        ctx.mark_non_differentiable(correct)
        return lse - tgt, correct

    @staticmethod
    def backward(ctx, g: Tensor, _g_correct: Tensor):  # type: ignore[override]
        dxn, dw, dnorms = backward_through_engine(ctx, g)
        return (dxn, dw, None, dnorms, *([None] * 7))


def backward_through_engine(ctx, g: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dL/dxn, dL/dW, dL/dnorms or None) of the per-row loss from what a head's forward saved on `ctx`.

    Rows with label -1 (a sharded head's rows whose class another rank owns) get no target-column
    gradient, so no engine code that indexes by label can pick one up (nor, for MagFace, a norm
    gradient: the owner's rank gives it).
    """
    xn, weight, labels, rw, c_y, psi, lse, p, rows = ctx.saved_tensors
    s, margin = ctx.s, ctx.margin
    dpsi = g * (torch.exp(s * psi - lse) - 1.0) * s
    dpsi = torch.where(labels >= 0, dpsi, torch.zeros_like(dpsi))
    dcy = dpsi * margin.dpsi(c_y, ctx.step, p)
    dnorms = dpsi * margin.dpsi_dp(c_y, ctx.step, p) if margin.norm_gradient else None
    # backward may run on a thread with autocast on; the head's contract is fp32
    with torch.autocast(xn.device.type, enabled=False):
        dxn, dw = ctx.engine.backward(xn, weight, rw, labels, psi, lse, g, dcy, s, ctx.t, rows)
    # engines write dW in the gradient's dtype: handed to autograd as it is, it becomes weight.grad
    # without a second C x D buffer (with zero_grad(set_to_none=True), PyTorch's default)
    return dxn, dw.to(gradient_dtype(weight)), dnorms


def head_rows(
    xn: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: Margin,
    step: int,
    s: float,
    t: float,
    engine: Engine,
    norms: Tensor | None = None,
    state: dict[str, Tensor] | None = None,
    training: bool = False,
) -> tuple[Tensor, Tensor]:
    """(per-row loss, per-row 1.0 where the target cosine is the largest) through `engine`. `norms`:
    the raw embeddings' norms (margins with per-row parameters); `state`: the margin's running state."""
    return _HeadFn.apply(
        xn, weight, labels, norms, margin, step, s, t, engine, {} if state is None else state, training
    )
