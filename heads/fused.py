"""Triton kernels for the blocked algorithm, on the tensor cores: the class products read fp16 (or
bf16) operands and accumulate in fp32 (`heads.core.operand_dtype`; fp32 operands in the interpreter,
whose bf16 dot is wrong).

Normalized weight: once per weight version the engine makes Wn = W * r (r the inverse row norms) in
the operand dtype and keeps it (keyed on the weight's storage, `_version`, shape and dtypes: an
optimizer step or any in-place write makes a new one; writes through `weight.data` are not seen).
One Triton pass (`_normalize_kernel`) makes r and Wn together when the head asks the engine for the
norms (`inv_norms`), so the fp32 master W is read from memory once per step; with the trainer's SGD
the optimizer step makes them instead, in its own pass over W (heads/fused_step.py: `adopt`), and
the forward makes none. Every kernel reads
Wn, 16-bit on the GPU: the products take it from shared memory as it arrives (no cast in
registers), and its elements lie in [-1, 1] (fp16's range is never at risk). Cost: C x D x 2
bytes (1 GB at C = 1M, D = 512), freed before the next one is made.

Forward (`_fwd_kernel`): program p owns a contiguous range of class tiles and sweeps every batch
tile for each (its Wn tile is re-read from L2, not memory: the 132 programs an H200 holds at once
keep 132 x BC x D x 2 bytes of Wn in flight, 17 MB for the first config at D = 512, inside the 50 MB
L2), keeping an online log-sum-exp in base 2 (log2 e folded into the
scale, exp2) and the best non-target cosine per row. Its partials (3 floats per row per program)
are combined on the host in a fixed order. Wn streams from memory once. With `save_logits=True`
it also writes the B x C cosines in the operand dtype (B x C x 2 bytes, kept until the backward)
so the backward skips the recompute; their rounding (up to 2^-11 relative in fp16) moves dL/dcos
by up to s * 2^-11 * |cos| relative (1.6% at s = 64, cos = 0.5), where a recomputed cosine is off
by ~5e-5 (fp16 operands' roundings, random over D = 512 terms).

Backward (`_bwd_kernel`), per chunk of `chunk` classes (sized so its B x chunk block of dL/dcos
mostly stays in L2), one program per class tile, two phases:
1. over all batch tiles: the tile's cosines (recomputed, or the saved ones), G = dL/dcos (operand
   dtype, into a B x chunk buffer) and h_j = sum_i G_ij cos_ij (fp32, in registers);
2. dW for the tile, D slab (2 BD columns) by slab: r_j (sum_i G_ij x_i - h_j Wn_j), the product
   over the batch reading back the G block the program just wrote (from L2), written straight into the
   C x D gradient in W's dtype; that buffer is handed to autograd as weight.grad.
Then dX += G @ Wn_chunk: one cuBLAS product with an fp32 result (the sum over classes, which a
class-parallel kernel would have to pass through memory per tile). The target column's entries,
rounded in G, are made exact afterwards (`heads.core.fix_target_terms(normalized=True)`). No
atomics anywhere: for a fixed set of kernel configs the result is bitwise reproducible.

Hard negatives (`HARD`, constexpr): 0 none, True SV-Softmax (s (t c + t - 1) above psi of the row),
2 CurricularFace (s c (tc + c) above psi, derivative s (tc + 2 c)): its t rides after the B
thresholds in THR (2B floats), so the kernels' signatures and the other variants' code are unchanged.

Configs: a few per kernel (below), pruned by the device's shared memory, autotuned on CUDA by Triton
keyed on (B, D) and the tensors' dtypes. `deterministic=True` skips the tuner and uses each kernel's
first config: bitwise the same result in every process on a given GPU model. The tuned default
picks by timing, so two processes may pick different tiles and differ in the last bits (never more
than the fp32 accumulation order). Memory beyond W, dW and Wn: forward 12 bytes x B x programs;
backward G (B x chunk, 2 bytes: 32 MiB at B=512), h and dX; with `save_logits` the B x C cosines.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from heads.core import fix_target_terms, mm_f32, operand_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with the CUDA and CPU stacks
    triton = None

LOG2E = 1.0 / math.log(2.0)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _on(device: torch.device):
    # Triton launches on the *current* CUDA device; tensors on another one (cuda:1 without
    # torch.cuda.set_device) would be read by a kernel running on the wrong GPU.
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


@dataclass(frozen=True)
class TileConfig:
    """One kernel configuration: tile sizes (batch, class, D) and launch shape."""

    bb: int
    bc: int
    bd: int
    warps: int = 4
    stages: int = 3

    def kwargs(self) -> dict[str, int]:
        return {"BB": self.bb, "BC": self.bc, "BD": self.bd}


# Tiles for Hopper (227 KB shared memory per block) that stay valid on an A100 (163 KB); configs that
# do not fit a smaller card are pruned. The first of each list is the deterministic mode's choice: the
# one bench/kernels.py's model rates fastest among those that, compiled for sm_90 and sm_80 at
# B = D = 512 in both modes, spill nothing. Its BB x BC fp32 accumulator is spread over 8 warps (64
# registers a thread at 128 x 128); one program per SM, whose epilogue overlaps the wgmma it leaves in
# flight. Larger class tiles cut the re-reads of X (once per class tile) from L2; 256 x 128 and wider
# spill. BD is 64 everywhere, so whether D needs masking is known before tuning.
# forward: (BB x BD) X tiles and (BC x BD) Wn tiles per stage
FWD_CONFIGS = (
    TileConfig(128, 128, 64, 8, 3),
    TileConfig(128, 64, 64, 8, 3),
    TileConfig(64, 128, 64, 8, 3),
    TileConfig(64, 64, 64, 4, 2),
)
# backward: phase 1 as the forward; phase 2 a (BC x 2 BD) dW tile, stepping BB batch rows per stage.
# Both phases' tiles take ~255 registers at these shapes: 128 x 128 (at 8 or 16 warps) and 128 x 64 at
# 4 warps spill.
BWD_CONFIGS = (
    TileConfig(64, 128, 64, 8, 3),
    TileConfig(128, 64, 64, 8, 3),
    TileConfig(64, 64, 64, 4, 3),
    TileConfig(64, 64, 64, 4, 2),
)
_BD = 64
assert all(c.bd == _BD for c in FWD_CONFIGS + BWD_CONFIGS)


def shared_bytes(cfg: TileConfig, kernel: str, x_bytes: int, w_bytes: int, g_bytes: int) -> int:
    """Shared memory a config's software pipeline needs: `stages` copies of the tiles it streams (the
    backward's two phases run one after the other: the larger of the two)."""
    cos = cfg.bb * cfg.bd * x_bytes + cfg.bc * cfg.bd * w_bytes
    if kernel == "bwd":
        return cfg.stages * max(cos, cfg.bb * cfg.bc * g_bytes + cfg.bb * 2 * cfg.bd * x_bytes)
    return cfg.stages * cos


def fitting(
    configs: tuple[TileConfig, ...], kernel: str, limit: int, x_bytes: int, w_bytes: int, g_bytes: int
) -> list[TileConfig]:
    """The configs whose pipeline fits `limit` bytes of shared memory (at least the smallest one)."""
    keep = [c for c in configs if shared_bytes(c, kernel, x_bytes, w_bytes, g_bytes) <= limit]
    return keep or [min(configs, key=lambda c: shared_bytes(c, kernel, x_bytes, w_bytes, g_bytes))]


def _smem_limit() -> int:
    dev = torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(dev)["max_shared_mem"]


def _to_triton(configs: tuple[TileConfig, ...]):
    return [triton.Config(c.kwargs(), num_warps=c.warps, num_stages=c.stages) for c in configs]


def _pruner(kernel: str, configs: tuple[TileConfig, ...]):
    by_kwargs = {tuple(sorted(c.kwargs().items())): c for c in configs}

    def prune(tconfigs, named_args, **kwargs):
        size = {k: v.element_size() for k, v in named_args.items() if hasattr(v, "element_size")}
        op = size.get("X", 2)
        mine = tuple(by_kwargs[tuple(sorted(tc.kwargs.items()))] for tc in tconfigs)
        keep = set(fitting(mine, kernel, _smem_limit(), op, op, op))
        return [tc for tc, c in zip(tconfigs, mine) if c in keep]

    return prune


if triton is not None:

    @triton.jit
    def _mma(a, b, acc, OPK: tl.constexpr):
        # OPK: the operand dtype, 0 fp32, 1 bf16, 2 fp16
        if OPK == 0:
            return tl.dot(a, b, acc, input_precision="ieee")  # exact fp32 (the interpreter, tests)
        else:
            return tl.dot(a, b, acc)  # bf16/fp16 from shared memory, fp32 accumulator

    @triton.jit
    def _cos_tile(
        X,
        WN,
        rows,
        cols,
        rmask,
        cmask,
        D,
        stride_x,
        stride_w,
        BB: tl.constexpr,
        BC: tl.constexpr,
        BD: tl.constexpr,
        OPK: tl.constexpr,
        EVEN_D: tl.constexpr,
    ):
        # int64 row offsets: cols * stride_w passes 2^31 once C * D >= 2^31. The tile pointers are
        # rebuilt from the scalar d0 each step: carried across steps, 2 pointer tensors cost
        # ~2 registers per element and spill.
        xrow = X + rows[:, None] * stride_x
        wrow = WN + cols.to(tl.int64)[:, None] * stride_w
        acc = tl.zeros((BB, BC), dtype=tl.float32)
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            if EVEN_D:
                x = tl.load(xrow + ds[None, :], mask=rmask[:, None], other=0.0)
                w = tl.load(wrow + ds[None, :], mask=cmask[:, None], other=0.0)
            else:
                x = tl.load(xrow + ds[None, :], mask=rmask[:, None] & (ds < D)[None, :], other=0.0)
                w = tl.load(wrow + ds[None, :], mask=cmask[:, None] & (ds < D)[None, :], other=0.0)
            acc = _mma(x, tl.trans(w), acc, OPK)
        return acc

    @triton.jit
    def _logit2(cos, thr, tc, s2, t, HARD: tl.constexpr):
        # the logit in base 2 (s2 = s log2 e); hard negatives (cos > psi of the row) get, HARD=1
        # (SV-Softmax): s (t cos + t - 1); HARD=2 (CurricularFace, tc its t per row): s cos (tc + cos)
        if HARD == 2:
            return (cos * s2) * tl.where(cos > thr[:, None], tc[:, None] + cos, 1.0)
        elif HARD:
            return tl.where(cos > thr[:, None], cos * (s2 * t) + s2 * (t - 1.0), cos * s2)
        else:
            return cos * s2

    @triton.jit
    def _row_t(THR, B, rows, rmask, thr, HARD: tl.constexpr):
        # CurricularFace's t, per row, after the B thresholds in THR (the kernels' signatures stay)
        if HARD == 2:
            return tl.load(THR + B + rows, mask=rmask, other=0.0)
        else:
            return thr

    @triton.jit
    def _fwd_kernel(
        X,
        WN,
        LAB,
        THR,
        M,
        L,
        MX,
        Z,
        B,
        C,
        D,
        stride_x,
        stride_w,
        stride_z,
        s2,
        t,
        HARD: tl.constexpr,
        SAVE: tl.constexpr,
        BB: tl.constexpr,
        BC: tl.constexpr,
        BD: tl.constexpr,
        OPK: tl.constexpr,
        EVEN_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        per = tl.cdiv(tl.cdiv(C, BC), tl.num_programs(0))  # class tiles per program
        for i in range(0, per):
            cols = (pid * per + i) * BC + tl.arange(0, BC)
            cmask = cols < C
            for b0 in range(0, B, BB):
                rows = b0 + tl.arange(0, BB)
                rmask = rows < B
                cos = _cos_tile(
                    X, WN, rows, cols, rmask, cmask, D, stride_x, stride_w, BB, BC, BD, OPK, EVEN_D
                )
                if SAVE:
                    zp = Z + rows.to(tl.int64)[:, None] * stride_z + cols[None, :]
                    tl.store(zp, cos.to(Z.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
                lab = tl.load(LAB + rows, mask=rmask, other=-1)  # int32
                valid = cmask[None, :] & (cols[None, :] != lab[:, None])
                thr = tl.load(THR + rows, mask=rmask, other=0.0)
                tc = _row_t(THR, B, rows, rmask, thr, HARD)
                # the best non-target cosine first: cos is then dead unless the logit needs it
                mx_tile = tl.max(tl.where(valid, cos, -2.0), axis=1)
                logit = tl.where(valid, _logit2(cos, thr, tc, s2, t, HARD), float("-inf"))
                off = pid * B + rows
                # the partials start at i = 0: the kernel never reads what it did not write (so the
                # autotuner may rerun it on the same buffers)
                seen = rmask & (i > 0)
                m_old = tl.load(M + off, mask=seen, other=-1e30)
                l_old = tl.load(L + off, mask=seen, other=0.0)
                mx_old = tl.load(MX + off, mask=seen, other=-2.0)
                m_new = tl.maximum(m_old, tl.max(logit, axis=1))
                l_new = l_old * tl.exp2(m_old - m_new) + tl.sum(tl.exp2(logit - m_new[:, None]), axis=1)
                mx_new = tl.maximum(mx_old, mx_tile)
                tl.store(M + off, m_new, mask=rmask)
                tl.store(L + off, l_new, mask=rmask)
                tl.store(MX + off, mx_new, mask=rmask)

    @triton.jit
    def _bwd_kernel(
        X,
        WN,
        RW,
        LAB,
        THR,
        LSE2,
        GS,
        DCY,
        Z,
        G,
        DW,
        B,
        D,
        c0,
        ck,
        stride_x,
        stride_w,
        stride_z,
        stride_g,
        stride_dw,
        s2,
        t,
        HARD: tl.constexpr,
        SAVED: tl.constexpr,
        BB: tl.constexpr,
        BC: tl.constexpr,
        BD: tl.constexpr,
        OPK: tl.constexpr,
        EVEN_D: tl.constexpr,
    ):
        local = tl.program_id(0) * BC + tl.arange(0, BC)  # column in this chunk
        cmask = local < ck
        cols = c0 + local
        # phase 1: G = dL/dcos for the tile, over every batch tile; h_j = sum_i G_ij cos_ij
        h = tl.zeros((BC,), dtype=tl.float32)
        for b0 in range(0, B, BB):
            rows = b0 + tl.arange(0, BB)
            rmask = rows < B
            if SAVED:
                zp = Z + rows.to(tl.int64)[:, None] * stride_z + cols[None, :]
                cos = tl.load(zp, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            else:
                cos = _cos_tile(
                    X, WN, rows, cols, rmask, cmask, D, stride_x, stride_w, BB, BC, BD, OPK, EVEN_D
                )
            lab = tl.load(LAB + rows, mask=rmask, other=-1)  # int32
            lse2 = tl.load(LSE2 + rows, mask=rmask, other=0.0)
            gs = tl.load(GS + rows, mask=rmask, other=0.0)  # dL/d(row loss) * s
            dcy = tl.load(DCY + rows, mask=rmask, other=0.0)
            if HARD == 2:
                thr = tl.load(THR + rows, mask=rmask, other=0.0)
                tc = _row_t(THR, B, rows, rmask, thr, HARD)
                hard = cos > thr[:, None]
                logit = tl.where(hard, cos * (tc[:, None] + cos) * s2, cos * s2)
                slope = tl.where(hard, tc[:, None] + 2.0 * cos, 1.0)  # d logit / d(s cos)
                dc = tl.exp2(logit - lse2[:, None]) * (gs[:, None] * slope)
            elif HARD:
                thr = tl.load(THR + rows, mask=rmask, other=0.0)
                hard = cos > thr[:, None]
                logit = tl.where(hard, cos * (s2 * t) + s2 * (t - 1.0), cos * s2)
                dc = tl.exp2(logit - lse2[:, None]) * tl.where(hard, gs[:, None] * t, gs[:, None])
            else:
                dc = tl.exp2(cos * s2 - lse2[:, None]) * gs[:, None]
            dc = tl.where(cols[None, :] == lab[:, None], dcy[:, None], dc)
            dc = tl.where(rmask[:, None] & cmask[None, :], dc, 0.0)
            h += tl.sum(dc * cos, axis=0)
            gp = G + rows[:, None] * stride_g + local[None, :]
            tl.store(gp, dc.to(G.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
        # phase 2 reads the G block this program's threads wrote: a barrier makes it visible
        tl.debug_barrier()
        # slabs of 2 BD columns: each slab re-reads the program's G columns, so half as many re-reads
        rw = tl.load(RW + cols, mask=cmask, other=0.0)
        wp = WN + cols.to(tl.int64)[:, None] * stride_w + tl.arange(0, 2 * BD)[None, :]
        dwp = DW + cols.to(tl.int64)[:, None] * stride_dw + tl.arange(0, 2 * BD)[None, :]
        for d0 in range(0, D, 2 * BD):
            ds = d0 + tl.arange(0, 2 * BD)
            dmask = ds < D
            acc = tl.zeros((BC, 2 * BD), dtype=tl.float32)
            for b0 in range(0, B, BB):
                rows = b0 + tl.arange(0, BB)
                rmask = rows < B
                g = tl.load(
                    G + rows[:, None] * stride_g + local[None, :],
                    mask=rmask[:, None] & cmask[None, :],
                    other=0.0,
                )
                x = tl.load(
                    X + rows[:, None] * stride_x + ds[None, :],
                    mask=rmask[:, None] & dmask[None, :],
                    other=0.0,
                )
                acc = _mma(tl.trans(g), x, acc, OPK)
            # d c_ij / d w_j = r_j (xn_i - c_ij Wn_j): the normalization's projection, as an epilogue
            wm = cmask[:, None] & dmask[None, :]
            wn = tl.load(wp, mask=wm, other=0.0).to(tl.float32)
            dw = rw[:, None] * (acc - h[:, None] * wn)
            tl.store(dwp, dw.to(DW.dtype.element_ty), mask=wm)
            wp += 2 * BD
            dwp += 2 * BD

    @triton.jit
    def _inv_norms(w, BR: tl.constexpr):
        # 1 / max(|w|, 1e-12) of each fp32 row in registers, correctly rounded (as torch's)
        ss = tl.sum(w * w, axis=1)
        return tl.div_rn(tl.full((BR,), 1.0, tl.float32), tl.maximum(tl.sqrt_rn(ss), 1e-12))

    @triton.jit
    def _normalize_kernel(
        W, RW, WN, C, D, stride_w, stride_n, NORMS: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr
    ):
        # Wn = W * r in the operand dtype, no fp32 temporary of C x D. One read of each row: BD >= D,
        # so a block's rows stay in registers between the norm and the scaled copy. NORMS: also
        # r = 1 / max(|w|, 1e-12) into RW; else r is read from RW.
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        rmask = rows < C
        ds = tl.arange(0, BD)
        m = rmask[:, None] & (ds < D)[None, :]
        w = tl.load(W + rows.to(tl.int64)[:, None] * stride_w + ds[None, :], mask=m, other=0.0).to(tl.float32)
        if NORMS:
            r = _inv_norms(w, BR)
            tl.store(RW + rows, r, mask=rmask)
        else:
            r = tl.load(RW + rows, mask=rmask, other=0.0)
        wn = (w * r[:, None]).to(WN.dtype.element_ty)
        tl.store(WN + rows.to(tl.int64)[:, None] * stride_n + ds[None, :], wn, mask=m)

    def _autotuned(kernel, configs: tuple[TileConfig, ...], kind: str):
        prune = {"early_config_prune": _pruner(kind, configs)}
        return triton.autotune(_to_triton(configs), key=["B", "D"], prune_configs_by=prune)(kernel)

    _fwd_tuned = _autotuned(_fwd_kernel, FWD_CONFIGS, "fwd")
    _bwd_tuned = _autotuned(_bwd_kernel, BWD_CONFIGS, "bwd")

_OPK = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def kernel_report(compiled, config) -> dict:
    """Registers and spills of a compiled kernel (None in the interpreter), and its config."""
    return {
        "config": str(config),
        "n_regs": getattr(compiled, "n_regs", None),
        "n_spills": getattr(compiled, "n_spills", None),
    }


def default_chunk(B: int, C: int, g_bytes: int) -> int:
    """Classes per backward chunk: a power of two whose B x chunk gradient block is at most 32 MiB
    (it mostly stays in the 50-60 MB L2 between the kernel that writes it and the product that
    reads it; fewer, larger chunks keep the 2 launches per chunk from making the pass launch-bound)."""
    fit = max(1, (32 << 20) // max(1, B * g_bytes))
    chunk = 1 << (fit.bit_length() - 1)
    return max(1024, min(65536, chunk, triton.next_power_of_2(C) if triton else C))


def normalize_block(D: int) -> tuple[int, int]:
    """(rows, columns) of a `_normalize_kernel` block: whole rows (a power of two >= D), 8192 elements
    (64 fp32 registers a thread at 4 warps), so each row is read once."""
    bd = 1 << max(0, (D - 1).bit_length())
    return max(1, 8192 // bd), bd


def _same(a: Tensor, b: Tensor) -> bool:
    """The same tensor data: storage and version (a saved tensor comes back as another object)."""
    return a.data_ptr() == b.data_ptr() and a._version == b._version and a.dtype == b.dtype


def _weight_key(weight: Tensor, op: torch.dtype) -> tuple:
    return (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, op, weight.device)


class FusedEngine:
    """Launches the kernels. `deterministic=True`: each kernel's first config, no autotuning (bitwise
    reproducible across processes). `configs` ({"fwd"|"bwd": TileConfig}) pins configs (tests);
    `operands` as `heads.core.operand_dtype`; `chunk` classes per backward chunk; `programs` the
    forward's program count (default 2 per SM); `save_logits=True` keeps the forward's B x C cosines
    (operand dtype) for the backward instead of recomputing them. `kernels` holds the last launch of
    each kernel: config, registers and spills."""

    def __init__(
        self,
        deterministic: bool = False,
        configs: dict[str, TileConfig] | None = None,
        operands: str = "auto",
        chunk: int | None = None,
        programs: int | None = None,
        save_logits: bool = False,
    ) -> None:
        if triton is None:
            raise RuntimeError("impl='fused' needs triton; use impl='chunked'")
        self.deterministic = deterministic
        self.subcenters = 1  # the kernels take one row per class (sub-centers: impl="chunked")
        self.configs = dict(configs or {})
        self.operands = operands
        self.chunk = chunk
        self.programs = programs
        self.save_logits = save_logits
        self.kernels: dict[str, dict] = {}
        self._wn: tuple[tuple, Tensor, Tensor] | None = None  # (weight key, rw, Wn)
        self._saved: tuple[tuple, Tensor] | None = None  # (key of the forward's inputs, cosines)

    def _check(self, t: Tensor) -> None:
        if t.device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                "impl='fused' needs a CUDA device, or TRITON_INTERPRET=1 set before triton "
                "is imported; use impl='chunked' (or 'auto') on the CPU"
            )
        if t.dtype == torch.float64:
            raise RuntimeError("impl='fused' computes in fp32; float64 is for the reference and chunked")

    def operand_dtype(self, xn: Tensor) -> torch.dtype:
        return operand_dtype(xn.device, xn.dtype, _interpreting(), self.operands)

    def inv_norms(self, weight: Tensor) -> Tensor:
        """1 / |w_j| (fp32), made with Wn in the same pass over W (the head's forward asks here, so the
        fp32 master W is read once per weight version)."""
        self._check(weight)
        return self._normalize(weight, None, self.operand_dtype(weight))[0]

    def normalized_weight(self, weight: Tensor, rw: Tensor, op: torch.dtype) -> Tensor:
        """Wn = W * rw in `op`, made once per weight version (the forward and backward of a step share it)."""
        return self._normalize(weight, rw, op)[1]

    def _normalize(self, weight: Tensor, rw: Tensor | None, op: torch.dtype) -> tuple[Tensor, Tensor]:
        """(rw, Wn), kept while the weight's version and rw (when given) are the same."""
        key = _weight_key(weight, op)
        if self._wn is not None and self._wn[0] == key and (rw is None or _same(rw, self._wn[1])):
            return self._wn[1], self._wn[2]
        self._wn = None  # the old copy goes before the new one is made: one C x D copy at a time
        weight = weight.contiguous()
        C, D = weight.shape
        wn = torch.empty((C, D), dtype=op, device=weight.device)
        norms = rw is None
        rw = torch.empty(C, device=weight.device) if norms else rw.float().contiguous()
        br, bd = normalize_block(D)
        with _on(weight.device):
            _normalize_kernel[(triton.cdiv(C, br),)](
                weight, rw, wn, C, D, weight.stride(0), wn.stride(0), NORMS=norms, BR=br, BD=bd
            )
        self._wn = (key, rw, wn)
        return rw, wn

    def spare_normalized(self, shape: torch.Size, op: torch.dtype, device: torch.device) -> Tensor | None:
        """The kept Wn's buffer, handed to an optimizer step that is about to replace it (one C x D
        copy at a time; heads.fused_step), or None when there is none of that shape and dtype."""
        kept, self._wn = self._wn, None
        if kept is None or (kept[2].shape, kept[2].dtype, kept[2].device) != (shape, op, device):
            return None
        return kept[2]

    def adopt(self, weight: Tensor, rw: Tensor, wn: Tensor) -> None:
        """(rw, Wn) of `weight` as it is now, made by the optimizer step that wrote it
        (heads.fused_step): the next forward makes no normalize pass."""
        self._wn = (_weight_key(weight, wn.dtype), rw, wn)

    def _launch(
        self,
        name: str,
        plain,
        tuned,
        configs: tuple[TileConfig, ...],
        grid,
        device: torch.device,
        *args,
        **const,
    ) -> None:
        tune = device.type == "cuda" and not _interpreting() and not self.deterministic
        if tune and name not in self.configs:
            with _on(device):
                compiled = tuned[grid](*args, **const)
            cfg = tuned.best_config
        else:
            cfg = self.configs.get(name, configs[0])
            with _on(device):
                compiled = plain[grid](
                    *args, **const, **cfg.kwargs(), num_warps=cfg.warps, num_stages=cfg.stages
                )
        self.kernels[name] = kernel_report(compiled, cfg)

    def _programs(self, C: int, device: torch.device) -> int:
        if self.programs is not None:
            want = self.programs
        elif device.type == "cuda":
            want = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        else:
            want = 2
        return max(1, min(want, triton.cdiv(C, min(c.bc for c in FWD_CONFIGS))))

    def _inputs(self, xn: Tensor, weight: Tensor, rw: Tensor):
        op = self.operand_dtype(xn)
        return op, xn.to(op).contiguous(), self.normalized_weight(weight, rw, op)

    @staticmethod
    def _hard(thr: Tensor, t: float | Tensor) -> tuple[Tensor, float, int | bool]:
        """(THR, the float t, HARD): CurricularFace (a tensor t) appends its t per row to the
        thresholds (read from memory: no host sync) and sets HARD=2; SV-Softmax is HARD=True."""
        if isinstance(t, Tensor):
            return torch.cat([thr.float(), t.float().expand(thr.shape[0])]), 1.0, 2
        return thr.float().contiguous(), float(t), t != 1.0

    def forward(
        self, xn: Tensor, weight: Tensor, rw: Tensor, labels: Tensor, thr: Tensor, s: float, t: float | Tensor
    ) -> tuple[Tensor, Tensor]:
        self._check(xn)
        thr, t, hard = self._hard(thr, t)
        op, x, wn = self._inputs(xn, weight, rw)
        B, D = x.shape
        C = wn.shape[0]
        n_prog = self._programs(C, x.device)
        m, l_, mx = (torch.empty((n_prog, B), device=x.device) for _ in range(3))
        self._saved = None
        cos = torch.empty((B, C) if self.save_logits else (1, 1), dtype=op, device=x.device)
        self._launch(
            "fwd",
            _fwd_kernel,
            _fwd_tuned,
            FWD_CONFIGS,
            (n_prog,),
            x.device,
            x,
            wn,
            labels.to(torch.int32),
            thr,
            m,
            l_,
            mx,
            cos,
            B,
            C,
            D,
            x.stride(0),
            wn.stride(0),
            cos.stride(0),
            float(s) * LOG2E,
            t,
            HARD=hard,
            SAVE=self.save_logits,
            OPK=_OPK[op],
            EVEN_D=D % _BD == 0,
        )
        if self.save_logits:
            self._saved = (self._saved_key(xn, weight, labels), cos)
        top = m.amax(0)
        lse2 = top + torch.log2((l_ * torch.exp2(m - top)).sum(0))
        return lse2 / LOG2E, mx.amax(0)

    @staticmethod
    def _saved_key(xn: Tensor, weight: Tensor, labels: Tensor) -> tuple:
        return (xn.data_ptr(), xn._version, labels.data_ptr(), _weight_key(weight, xn.dtype))

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
    ) -> tuple[Tensor, Tensor]:
        op, x, wn = self._inputs(xn, weight, rw)
        thr, t, hard = self._hard(thr, t)
        B, D = x.shape
        C = wn.shape[0]
        # the saved cosines, when they are this forward's (another forward in between: recompute)
        saved = self._saved if self._saved and self._saved[0] == self._saved_key(xn, weight, labels) else None
        self._saved = None
        cos = saved[1] if saved else torch.empty((1, 1), dtype=op, device=x.device)
        ck_max = self.chunk or default_chunk(B, C, torch.finfo(op).bits // 8)
        gbuf = torch.empty((B, ck_max), dtype=op, device=x.device)
        dx = torch.zeros((B, D), dtype=torch.float32, device=x.device)
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        rows = (
            labels.to(torch.int32),
            thr,
            (lse.float() * LOG2E).contiguous(),
            (g.float() * s).contiguous(),
            dcy.float().contiguous(),
        )
        for c0 in range(0, C, ck_max):
            ck = min(ck_max, C - c0)
            self._launch(
                "bwd",
                _bwd_kernel,
                _bwd_tuned,
                BWD_CONFIGS,
                lambda meta, ck=ck: (triton.cdiv(ck, meta["BC"]),),
                x.device,
                x,
                wn,
                rw,
                *rows,
                cos,
                gbuf,
                dw,
                B,
                D,
                c0,
                ck,
                x.stride(0),
                wn.stride(0),
                cos.stride(0),
                gbuf.stride(0),
                dw.stride(0),
                float(s) * LOG2E,
                t,
                HARD=hard,
                SAVED=saved is not None,
                OPK=_OPK[op],
                EVEN_D=D % _BD == 0,
            )
            mm_f32(gbuf[:, :ck], wn[c0 : c0 + ck], out=dx)  # cuBLAS: the sum over classes
        fix_target_terms(xn, x, weight, rw, labels, dcy, dx, dw, normalized=True)
        return dx.to(xn.dtype), dw
