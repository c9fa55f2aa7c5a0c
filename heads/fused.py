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

Backward (`_bwd_kernel`), per chunk of `chunk` classes (`default_chunk`: with saved cosines its B x
chunk block of dL/dcos mostly stays in L2; recomputing, larger: fewer launches), one program per
class tile, two phases:
1. over all batch tiles: the tile's cosines (recomputed, or the saved ones), G = dL/dcos (operand
   dtype, into a B x chunk buffer) and h_j = sum_i G_ij cos_ij (fp32, in registers);
2. dW for the tile, D slab (SLAB BD columns, 128 or 256) by slab: r_j (sum_i G_ij x_i - h_j Wn_j), the product
   over the batch reading back the G block the program just wrote (from L2), written straight into the
   C x D gradient in `heads.core.gradient_dtype(weight)` (W's, or torch's weight.grad_dtype: a bf16
   dW is half the saved mode's largest write, 1 of its 4 GB at C = 1M, D = 512; the sums stay fp32
   until the one rounding); that buffer is handed to autograd as weight.grad.
Then dX += G @ Wn_chunk: one cuBLAS product with an fp32 result (the sum over classes, which a
class-parallel kernel would have to pass through memory per tile). The target column's entries,
rounded in G, are made exact afterwards (`heads.core.fix_target_terms(normalized=True)`). No
atomics anywhere: for a fixed set of kernel configs the result is bitwise reproducible.

Hard negatives (`HARD`, constexpr): 0 none, True SV-Softmax (s (t c + t - 1) above psi of the row),
2 CurricularFace (s c (tc + c) above psi, derivative s (tc + 2 c)): its t rides after the B
thresholds in THR (2B floats), so the kernels' signatures and the other variants' code are unchanged.

Sub-centers (`K`, constexpr; `subcenters=K`): W holds K rows a class, class j's rows j K .. j K + K - 1.
A program's class tile sweeps its K rows in turn (`_class_cos`: K products into one accumulator, the
running max and the first argmax kept on chip); a class's cosine is the max. The backward recomputes
max and argmax, or with `save_logits` reads the saved per-class maxima and each one's argmax row
(int8, 1 byte a logit: cheaper than redoing the K products the saved mode exists to skip). G holds K
columns a class (sub-center k's at k ck + local, zero but at the argmax), phase 2 runs once per
sub-center row, and dX takes K cuBLAS products a chunk (every K-th row of Wn). dc_y goes to the row
c_y came from (TROW: `heads.core.target_cosines`, the first max on ties, as torch's max in the
chunked engine), which the exact target terms use too. K = 1 compiles to the one-row code (constexpr
branches); K > 1 launches skip the configs that spill with it (`configs_for`).

Tiles move through tensor descriptors on sm_90 and later (TMA: bounds and zero fill in hardware, no
per-element pointers in registers; the rows of X, Wn and dW must be whole 16-byte units, so D is a
multiple of 8 and `impl='auto'` picks the chunked engine otherwise) and through masked pointer tiles
on sm_80, which has no TMA (`TMA`, constexpr). The backward's G stays a pointer tile: its program
writes it in phase 1 and reads it in phase 2, an order a descriptor read would not keep.

Configs: a few per kernel (below), pruned by the device's shared memory, autotuned on CUDA by Triton
keyed on (B, D, K, the mode: SAVE / SAVED) and the tensors' dtypes (so a bf16 dW is tuned apart).
`deterministic=True` skips the tuner and uses each kernel's first config: bitwise the same result in
every process on a given GPU model. The tuned default picks by timing, so two processes may pick
different tiles and differ in the last bits (never more than the fp32 accumulation order). Memory
beyond W, dW and Wn: forward 12 bytes x B x programs; backward G (B x chunk x K, 2 bytes: at most 256
MiB, 32 MiB with saved cosines), h and dX; with `save_logits` the B x C cosines (and with K > 1 their
B x C argmax rows, 1 byte each)."""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from heads.core import FUSED_DIM_MULTIPLE, fix_target_terms, gradient_dtype, mm_f32, operand_dtype

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
    """One kernel configuration: tile sizes (batch, class, D) and launch shape. `tma`: only where the
    kernels read through tensor descriptors (sm_90+; through pointer tiles it spills); `one_row`: only
    with one row a class (next to the running max and argmax of K sub-center cosines it spills)."""

    bb: int
    bc: int
    bd: int
    warps: int = 4
    stages: int = 3
    tma: bool = False
    one_row: bool = False
    slab: int = 0  # the backward's phase-2 dW slab, in BD columns (its SLAB); 0 for the forward

    def kwargs(self) -> dict[str, int]:
        return {"BB": self.bb, "BC": self.bc, "BD": self.bd, **({"SLAB": self.slab} if self.slab else {})}


# Tiles for Hopper (227 KB shared memory per block) that stay valid on an A100 (163 KB); configs that
# do not fit a smaller card are pruned. The first a launch may take (`configs_for`) is the
# deterministic mode's choice: the one bench/kernels.py's model rates fastest among those that,
# compiled for sm_90 and sm_80 at B = D = 512 in both modes, spill nothing. Tensor descriptors (sm_90)
# free the registers pointer tiles take, so the forward's 256 x 128 tile fits 8 warps there (254
# registers, 0 spilled): X tiles twice as tall halve the re-reads of each Wn tile, and the forward is
# bound by the tensor cores, not L2 (0.67 vs 0.73 ms modelled on the H200). 128 x 256 spills. BD is 64
# everywhere, so whether D needs masking is known before tuning.
# forward: (BB x BD) X tiles and (BC x BD) Wn tiles per stage
FWD_CONFIGS = (
    TileConfig(256, 128, 64, 8, 3, tma=True, one_row=True),
    TileConfig(128, 128, 64, 8, 3, one_row=True),
    TileConfig(128, 64, 64, 8, 3),
    TileConfig(64, 128, 64, 8, 3),
    TileConfig(64, 64, 64, 4, 2),
)
# backward: phase 1 as the forward; phase 2 a (BC x SLAB BD) dW tile, stepping `phase2_rows` batch
# rows per stage; each slab re-reads the program's G columns. 128 x 128 (one read of each Wn tile per
# 128 batch rows, not 64: 1.68 vs 2.09 ms modelled on the H200) spills nothing since phase 2 steps 64
# rows and the SV-Softmax logit takes one select. Through descriptors (sm_90) it fits 16 warps with
# 256-wide slabs (128 registers, 0 spilled; phase 2 steps 32 rows): half the re-reads of G, 1.47 vs
# 1.68 ms modelled; its 4 warpgroups split the tile into m64n64 wgmmas, a rate the model takes as
# m64n128's (for the GPU to confirm). 256 x 128 and 128 x 256 spill 200-800 B even through
# descriptors: their phase-1 epilogue holds two 128-register tiles (the cosines and dL/dcos).
BWD_CONFIGS = (
    TileConfig(128, 128, 64, 16, 3, tma=True, one_row=True, slab=4),
    TileConfig(128, 128, 64, 8, 3, one_row=True, slab=2),
    TileConfig(64, 128, 64, 8, 3, one_row=True, slab=2),
    TileConfig(128, 64, 64, 8, 3, slab=2),
    TileConfig(64, 64, 64, 4, 3, slab=2),
    TileConfig(64, 64, 64, 4, 2, slab=2),
)
KERNEL_CONFIGS = {"fwd": FWD_CONFIGS, "bwd": BWD_CONFIGS}
_BD = 64
assert all(c.bd == _BD for c in FWD_CONFIGS + BWD_CONFIGS)
# phase 2's batch step (the K dimension of its G^T X product): BB, but at most P2_ELEMS // BC rows
# (halved with 256-wide slabs), so its G tiles are never larger than 64 x 128 (128 x 128 spilled with
# 128-row ones; 128 x 64 at K = 2 spills with 64-row ones); a smaller step only adds trips, no traffic
P2_ELEMS = 8192


def phase2_rows(bb: int, bc: int, slab: int = 2) -> int:
    """Phase 2's batch step for a (BB, BC) tile with SLAB-BD-wide slabs (`_bwd_kernel`'s P2)."""
    return min(bb, P2_ELEMS // bc // (slab // 2))


def configs_for(configs: tuple, subcenters: int, tma: bool) -> tuple:
    """The configs a launch may take: with K > 1 sub-centers none marked `one_row` (compiled at K = 2
    for sm_90 and sm_80, bench/kernels.py --subcenters 2: the forward's 256 x 128 and 128 x 128, the
    backward's 128 x 128 and 64 x 128 spill; the next, 128 x 64, spills nothing with SV-Softmax or
    CurricularFace, 16-28 B with no hard negatives on sm_90); without tensor descriptors none marked
    `tma`."""
    return tuple(c for c in configs if (tma or not c.tma) and (subcenters == 1 or not c.one_row))


def shared_bytes(
    cfg: TileConfig, kernel: str, x_bytes: int, w_bytes: int, g_bytes: int, dw_bytes: int = 0
) -> int:
    """Shared memory a config's software pipeline needs: `stages` copies of the tiles it streams (the
    backward's two phases run one after the other: the larger of the two); `dw_bytes` the bytes of a
    dW element where the backward stores dW through a descriptor, which stages each (BC x slab) tile
    in shared memory (0 with pointer stores)."""
    cos = cfg.bb * cfg.bd * x_bytes + cfg.bc * cfg.bd * w_bytes
    if kernel == "bwd":
        width = cfg.slab * cfg.bd
        p2 = phase2_rows(cfg.bb, cfg.bc, cfg.slab)
        return max(
            cfg.stages * cos,
            cfg.stages * p2 * (cfg.bc * g_bytes + width * x_bytes) + cfg.bc * width * dw_bytes,
        )
    return cfg.stages * cos


def fitting(
    configs: tuple[TileConfig, ...],
    kernel: str,
    limit: int,
    x_bytes: int,
    w_bytes: int,
    g_bytes: int,
    dw_bytes: int = 0,
) -> list[TileConfig]:
    """The configs whose pipeline fits `limit` bytes of shared memory (at least the smallest one)."""

    def need(c: TileConfig) -> int:
        return shared_bytes(c, kernel, x_bytes, w_bytes, g_bytes, dw_bytes)

    return [c for c in configs if need(c) <= limit] or [min(configs, key=need)]


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
        tma = kwargs.get("TMA", True)
        dw = size.get("DW", 4) if tma and kernel == "bwd" else 0  # dW tiles staged for the descriptor
        keep = set(fitting(configs_for(mine, kwargs.get("K", 1), tma), kernel, _smem_limit(), op, op, op, dw))
        return [tc for tc, c in zip(tconfigs, mine) if c in keep]

    return prune


if triton is not None:
    P2_ELEMS_C = tl.constexpr(P2_ELEMS)

    @triton.jit
    def _mma(a, b, acc, OPK: tl.constexpr):
        # OPK: the operand dtype, 0 fp32, 1 bf16, 2 fp16
        if OPK == 0:
            return tl.dot(a, b, acc, input_precision="ieee")  # exact fp32 (the interpreter, tests)
        else:
            return tl.dot(a, b, acc)  # bf16/fp16 from shared memory, fp32 accumulator

    # Tiles of X (B x D) and of one sub-center's rows of a (n K x D) row block (Wn, dW: rows c K + k).
    # TMA (sm_90+): through tensor descriptors made once per program: a load fills what lies past the
    # bounds with zeros and holds no per-element pointers (2 registers an element as pointer tensors:
    # those made 128 x 256 tiles spill). Otherwise (sm_80, which has no TMA and on which descriptors
    # lower to the same pointer loads, spilling) pointer tiles with masks, D's only where EVEN_D is off.
    @triton.jit
    def _x_desc(X, B, D, stride_x, BR: tl.constexpr, BDc: tl.constexpr, TMA: tl.constexpr):
        if TMA:
            return tl.make_tensor_descriptor(X, shape=[B, D], strides=[stride_x, 1], block_shape=[BR, BDc])
        else:
            return X

    @triton.jit
    def _rows_desc(W, n, K: tl.constexpr, D, stride, BR: tl.constexpr, BDc: tl.constexpr, TMA: tl.constexpr):
        # [class, sub-center, column] view: (BR x 1 x BDc) blocks bounded by n classes and D columns
        if TMA:
            return tl.make_tensor_descriptor(
                W, shape=[n, K, D], strides=[K * stride, stride, 1], block_shape=[BR, 1, BDc]
            )
        else:
            return W

    @triton.jit
    def _x_tile(
        xd,
        r0,
        d0,
        B,
        D,
        stride_x,
        BR: tl.constexpr,
        BDc: tl.constexpr,
        TMA: tl.constexpr,
        EVEN_D: tl.constexpr,
    ):
        if TMA:
            return xd.load([r0, d0])
        else:
            rows = r0 + tl.arange(0, BR)
            ds = d0 + tl.arange(0, BDc)
            m = (rows < B)[:, None] & ((ds < D)[None, :] | EVEN_D)
            return tl.load(xd + rows[:, None] * stride_x + ds[None, :], mask=m, other=0.0)

    @triton.jit
    def _row_ptrs(
        wd,
        c0,
        k,
        d0,
        n,
        K: tl.constexpr,
        D,
        stride,
        BR: tl.constexpr,
        BDc: tl.constexpr,
        EVEN_D: tl.constexpr,
    ):
        # pointers and mask of the (BR x BDc) tile of rows (c0 + i) K + k, columns d0..; int64 rows:
        # rows x stride passes 2^31 once C K D does
        cls = c0 + tl.arange(0, BR)
        ds = d0 + tl.arange(0, BDc)
        ptrs = wd + (cls.to(tl.int64) * K + k)[:, None] * stride + ds[None, :]
        return ptrs, (cls < n)[:, None] & ((ds < D)[None, :] | EVEN_D)

    @triton.jit
    def _w_tile(
        wd,
        c0,
        k,
        d0,
        n,
        K: tl.constexpr,
        D,
        stride,
        BR: tl.constexpr,
        BDc: tl.constexpr,
        TMA: tl.constexpr,
        EVEN_D: tl.constexpr,
    ):
        if TMA:
            return wd.load([c0, k, d0]).reshape(BR, BDc)
        else:
            ptrs, m = _row_ptrs(wd, c0, k, d0, n, K, D, stride, BR, BDc, EVEN_D)
            return tl.load(ptrs, mask=m, other=0.0)

    @triton.jit
    def _cos_tile(
        xd,
        wd,
        r0,
        c0,
        k,
        B,
        n,
        D,
        stride_x,
        stride_w,
        BB: tl.constexpr,
        BC: tl.constexpr,
        BD: tl.constexpr,
        OPK: tl.constexpr,
        K: tl.constexpr,
        TMA: tl.constexpr,
        EVEN_D: tl.constexpr,
    ):
        # the (BB x BC) cosines of rows r0.. and sub-center k of classes c0..; zeros past B, n and D
        acc = tl.zeros((BB, BC), dtype=tl.float32)
        for d0 in range(0, D, BD):
            x = _x_tile(xd, r0, d0, B, D, stride_x, BB, BD, TMA, EVEN_D)
            w = _w_tile(wd, c0, k, d0, n, K, D, stride_w, BC, BD, TMA, EVEN_D)
            acc = _mma(x, tl.trans(w), acc, OPK)
        return acc

    @triton.jit
    def _class_cos(xd, wd, r0, c0, B, n, D, stride_x, stride_w, BB, BC, BD, OPK, K, TMA, EVEN_D):
        # (each class's cosine, which of its rows it is): K = 1 the class row's (_cos_tile alone);
        # sub-centers the largest of class j's K rows j K .. j K + K - 1, the first on ties as torch's
        # max in the chunked engine, so both route the gradient to one row. BB .. EVEN_D: constexprs.
        best = _cos_tile(xd, wd, r0, c0, 0, B, n, D, stride_x, stride_w, BB, BC, BD, OPK, K, TMA, EVEN_D)
        if K == 1:
            arg = 0
        else:
            arg = tl.zeros((BB, BC), dtype=tl.int32)
            for k in tl.static_range(1, K):
                cos = _cos_tile(
                    xd, wd, r0, c0, k, B, n, D, stride_x, stride_w, BB, BC, BD, OPK, K, TMA, EVEN_D
                )
                arg = tl.where(cos > best, k, arg)
                best = tl.maximum(best, cos)
        return best, arg

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
        ZA,
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
        K: tl.constexpr,
        BB: tl.constexpr,
        BC: tl.constexpr,
        BD: tl.constexpr,
        OPK: tl.constexpr,
        EVEN_D: tl.constexpr,
        TMA: tl.constexpr,
    ):
        pid = tl.program_id(0)
        per = tl.cdiv(tl.cdiv(C, BC), tl.num_programs(0))  # class tiles per program
        xd = _x_desc(X, B, D, stride_x, BB, BD, TMA)
        wd = _rows_desc(WN, C, K, D, stride_w, BC, BD, TMA)
        for i in range(0, per):
            c0 = (pid * per + i) * BC
            cols = c0 + tl.arange(0, BC)
            cmask = cols < C
            for b0 in range(0, B, BB):
                rows = b0 + tl.arange(0, BB)
                rmask = rows < B
                cos, arg = _class_cos(
                    xd, wd, b0, c0, B, C, D, stride_x, stride_w, BB, BC, BD, OPK, K, TMA, EVEN_D
                )
                if SAVE:
                    zp = Z + rows.to(tl.int64)[:, None] * stride_z + cols[None, :]
                    tl.store(zp, cos.to(Z.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
                    if K > 1:  # and each class's argmax sub-center (1 byte), for the backward
                        zap = ZA + rows.to(tl.int64)[:, None] * stride_z + cols[None, :]
                        tl.store(zap, arg.to(tl.int8), mask=rmask[:, None] & cmask[None, :])
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
        TROW,
        Z,
        ZA,
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
        K: tl.constexpr,
        KP: tl.constexpr,
        BB: tl.constexpr,
        BC: tl.constexpr,
        BD: tl.constexpr,
        OPK: tl.constexpr,
        EVEN_D: tl.constexpr,
        TMA: tl.constexpr,
        SLAB: tl.constexpr,
    ):
        P2: tl.constexpr = min(BB, P2_ELEMS_C // BC // (SLAB // 2))  # phase2_rows(BB, BC, SLAB)
        SW: tl.constexpr = SLAB * BD  # phase 2's slab width
        l0 = tl.program_id(0) * BC
        local = l0 + tl.arange(0, BC)  # column in this chunk
        cmask = local < ck
        cols = c0 + local
        xd = _x_desc(X, B, D, stride_x, BB, BD, TMA)
        wd = _rows_desc(WN + c0.to(tl.int64) * K * stride_w, ck, K, D, stride_w, BC, BD, TMA)
        # phase 1: G = dL/dcos for the tile, over every batch tile; h_j = sum_i G_ij cos_ij
        h = tl.zeros((BC,), dtype=tl.float32)
        hs = tl.zeros((BC, KP), dtype=tl.float32)  # sub-centers: h of row j K + k in column k
        ks = tl.arange(0, KP)
        for b0 in range(0, B, BB):
            rows = b0 + tl.arange(0, BB)
            rmask = rows < B
            if SAVED:
                zp = Z + rows.to(tl.int64)[:, None] * stride_z + cols[None, :]
                cos = tl.load(zp, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                if K > 1:
                    zap = ZA + rows.to(tl.int64)[:, None] * stride_z + cols[None, :]
                    arg = tl.load(zap, mask=rmask[:, None] & cmask[None, :], other=0).to(tl.int32)
            else:
                cos, arg = _class_cos(
                    xd, wd, b0, l0, B, ck, D, stride_x, stride_w, BB, BC, BD, OPK, K, TMA, EVEN_D
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
                # one select: a = t on hard negatives, 1 elsewhere (logit cos s2 + 0, slope gs), the
                # same values as two selects, one fp32 tile fewer live (128 x 128 spilled with two)
                a = tl.where(cos > thr[:, None], t, 1.0)
                logit = cos * (s2 * a) + s2 * (a - 1.0)
                dc = tl.exp2(logit - lse2[:, None]) * (gs[:, None] * a)
            else:
                dc = tl.exp2(cos * s2 - lse2[:, None]) * gs[:, None]
            dc = tl.where(cols[None, :] == lab[:, None], dcy[:, None], dc)
            # no mask of rows and columns outside B and the chunk (one fp32 tile less): rows past B
            # load gs = dcy = 0 and a cosine of 0 (dc = 0), G's stores are masked, and a column past
            # the chunk has its own h, which phase 2 never stores
            if K == 1:
                h += tl.sum(dc * cos, axis=0)
                gp = G + rows[:, None] * stride_g + local[None, :]
                tl.store(gp, dc.to(G.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
            else:
                # a class's gradient goes to its argmax row alone, the target's to the row its c_y came
                # from (TROW: heads.core.target_cosines); G's columns k ck + local hold sub-center k's
                trow = tl.load(TROW + rows, mask=rmask, other=0)
                arg = tl.where(cols[None, :] == lab[:, None], (trow - lab * K)[:, None], arg)
                for k in tl.static_range(K):
                    dck = tl.where(arg == k, dc, 0.0)
                    hs += tl.where(ks[None, :] == k, tl.sum(dck * cos, axis=0)[:, None], 0.0)
                    gp = G + rows[:, None] * stride_g + (k * ck + local)[None, :]
                    tl.store(gp, dck.to(G.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
        # phase 2 reads the G block this program's threads wrote: a barrier makes it visible
        tl.debug_barrier()
        # slabs of SW columns: each re-reads the program's G columns, so wider slabs mean fewer re-reads
        xd2 = _x_desc(X, B, D, stride_x, P2, SW, TMA)
        wd2 = _rows_desc(WN + c0.to(tl.int64) * K * stride_w, ck, K, D, stride_w, BC, SW, TMA)
        dwd = _rows_desc(DW + c0.to(tl.int64) * K * stride_dw, ck, K, D, stride_dw, BC, SW, TMA)
        for k in tl.static_range(K):
            # sub-center k's rows cols K + k, their G columns k ck + local and h (K = 1: the class rows)
            wrows = cols if K == 1 else cols * K + k
            gcols = local if K == 1 else k * ck + local
            hk = h if K == 1 else tl.sum(tl.where(ks[None, :] == k, hs, 0.0), axis=1)
            rw = tl.load(RW + wrows, mask=cmask, other=0.0)
            if not TMA:  # row pointers made once, moved along the slabs (sm_80 spills making them per slab)
                if k == 0:
                    wp = WN + wrows.to(tl.int64)[:, None] * stride_w + tl.arange(0, SW)[None, :]
                    dwp = DW + wrows.to(tl.int64)[:, None] * stride_dw + tl.arange(0, SW)[None, :]
                else:  # the next row on from where the slabs left them: no second set of row pointers
                    wp += stride_w - tl.cdiv(D, SW) * SW
                    dwp += stride_dw - tl.cdiv(D, SW) * SW
            for d0 in range(0, D, SW):
                acc = tl.zeros((BC, SW), dtype=tl.float32)
                for b0 in range(0, B, P2):
                    rows = b0 + tl.arange(0, P2)
                    rmask = rows < B
                    g = tl.load(
                        G + rows[:, None] * stride_g + gcols[None, :],
                        mask=rmask[:, None] & cmask[None, :],
                        other=0.0,
                    )
                    x = _x_tile(xd2, b0, d0, B, D, stride_x, P2, SW, TMA, False)
                    acc = _mma(tl.trans(g), x, acc, OPK)
                # d c_ij / d w_j = r_j (xn_i - c_ij Wn_j): the normalization's projection, as an epilogue
                if TMA:
                    wn = wd2.load([l0, k, d0]).reshape(BC, SW).to(tl.float32)
                    dw = rw[:, None] * (acc - hk[:, None] * wn)
                    dwd.store([l0, k, d0], dw.to(DW.dtype.element_ty).reshape(BC, 1, SW))
                else:
                    wm = cmask[:, None] & (d0 + tl.arange(0, SW) < D)[None, :]
                    wn = tl.load(wp, mask=wm, other=0.0).to(tl.float32)
                    dw = rw[:, None] * (acc - hk[:, None] * wn)
                    tl.store(dwp, dw.to(DW.dtype.element_ty), mask=wm)
                    wp += SW
                    dwp += SW

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

    def _autotuned(kernel, configs: tuple[TileConfig, ...], kind: str, mode: str):
        # `mode` (SAVE, SAVED): writing or reading the saved cosines compiles other code with other
        # bounds (the saved backward is memory-bound, the recomputing one L2-bound), tuned apart
        prune = {"early_config_prune": _pruner(kind, configs)}
        return triton.autotune(_to_triton(configs), key=["B", "D", "K", mode], prune_configs_by=prune)(kernel)

    _fwd_tuned = _autotuned(_fwd_kernel, FWD_CONFIGS, "fwd", "SAVE")
    _bwd_tuned = _autotuned(_bwd_kernel, BWD_CONFIGS, "bwd", "SAVED")

_OPK = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def kernel_report(compiled, config) -> dict:
    """Registers and spills of a compiled kernel (None in the interpreter), and its config."""
    return {
        "config": str(config),
        "n_regs": getattr(compiled, "n_regs", None),
        "n_spills": getattr(compiled, "n_spills", None),
    }


def default_chunk(B: int, C: int, g_bytes: int, saved: bool = False) -> int:
    """Classes per backward chunk: a power of two (at least 1024) whose B x chunk block of dL/dcos fits
    a budget. With saved cosines the backward is bound by memory, so the block is at most 32 MiB: it
    mostly stays in the 50-60 MB L2 between the kernel that writes it and the dX product that reads
    it. Recomputing, the backward is bound by its products' L2 reads and the dX product by the tensor
    cores, so the block's trip through memory costs nothing there; it may be 256 MiB, which makes 4
    chunks at B = 512, C = 1M instead of 31, and 8 launches (each with a tail) instead of 62
    (bench/kernel_model.py: forward + backward 3.39 -> 3.09 ms on the H200)."""
    fit = max(1, ((32 if saved else 256) << 20) // max(1, B * g_bytes))
    chunk = 1 << (fit.bit_length() - 1)
    return max(1024, min(chunk, triton.next_power_of_2(C) if triton else C))


def normalize_block(D: int) -> tuple[int, int]:
    """(rows, columns) of a `_normalize_kernel` block: whole rows (a power of two >= D), 8192 elements
    (64 fp32 registers a thread at 4 warps), so each row is read once."""
    bd = 1 << max(0, (D - 1).bit_length())
    return max(1, 8192 // bd), bd


def _tma(device: torch.device) -> bool:
    """Whether the kernels read and write through tensor descriptors: on sm_90 and later (TMA), and
    in the interpreter (which checks their bounds and alignment the same way)."""
    return _interpreting() or torch.cuda.get_device_capability(device)[0] >= 9


def _descriptor_scratch(size: int, alignment: int, stream) -> Tensor:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    return torch.empty(size, dtype=torch.int8, device=device)


def enable_descriptors() -> None:
    """Before launching the kernels: they make their tensor descriptors on the device, in scratch
    memory Triton asks this process's allocator for."""
    triton.set_allocator(_descriptor_scratch)


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
    (operand dtype) for the backward instead of recomputing them; `subcenters` K: weight rows per
    class (sub-center ArcFace; the K constexpr of the kernels); `tma` tensor descriptors or pointer
    tiles (default: descriptors on sm_90+ and in the interpreter; False runs an A100's code, tests).
    `kernels` holds the last launch of each kernel: config, registers and spills."""

    def __init__(
        self,
        deterministic: bool = False,
        configs: dict[str, TileConfig] | None = None,
        operands: str = "auto",
        chunk: int | None = None,
        programs: int | None = None,
        save_logits: bool = False,
        subcenters: int = 1,
        tma: bool | None = None,
    ) -> None:
        if triton is None:
            raise RuntimeError("impl='fused' needs triton; use impl='chunked'")
        self.deterministic = deterministic
        self.subcenters = int(subcenters)
        self.configs = dict(configs or {})
        self.operands = operands
        self.chunk = chunk
        self.programs = programs
        self.save_logits = save_logits
        self.tma = tma
        self.kernels: dict[str, dict] = {}
        self._wn: tuple[tuple, Tensor, Tensor] | None = None  # (weight key, rw, Wn)
        # (key of the forward's inputs, cosines, sub-centers: their argmax rows)
        self._saved: tuple[tuple, Tensor, Tensor] | None = None

    def _check(self, t: Tensor) -> None:
        if t.device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                "impl='fused' needs a CUDA device, or TRITON_INTERPRET=1 set before triton "
                "is imported; use impl='chunked' (or 'auto') on the CPU"
            )
        if t.dtype == torch.float64:
            raise RuntimeError("impl='fused' computes in fp32; float64 is for the reference and chunked")
        if t.shape[-1] % FUSED_DIM_MULTIPLE:
            raise RuntimeError(
                f"impl='fused' needs an embedding size that is a multiple of {FUSED_DIM_MULTIPLE} (its "
                f"kernels read 16-byte rows), not {t.shape[-1]}; use impl='chunked' (or 'auto')"
            )

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
        enable_descriptors()
        tune = device.type == "cuda" and not _interpreting() and not self.deterministic
        if tune and name not in self.configs:
            with _on(device):
                compiled = tuned[grid](*args, **const)
            cfg = tuned.best_config
        else:
            cfg = self.configs.get(name, configs_for(configs, const["K"], const["TMA"])[0])
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

    def _uses_tma(self, device: torch.device) -> bool:
        """Tensor descriptors or pointer tiles: the engine's `tma` where given, else the device's."""
        return _tma(device) if self.tma is None else self.tma

    def _inputs(self, xn: Tensor, weight: Tensor, rw: Tensor):
        op = self.operand_dtype(xn)
        x = xn.to(op).contiguous()
        if x.data_ptr() % 16:  # a view at an odd offset: tensor descriptors need 16-byte aligned bases
            x = x.clone()
        return op, x, self.normalized_weight(weight, rw, op)

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
        tma = self._uses_tma(x.device)
        B, D = x.shape
        K = self.subcenters
        C = wn.shape[0] // K
        n_prog = self._programs(C, x.device)
        m, l_, mx = (torch.empty((n_prog, B), device=x.device) for _ in range(3))
        self._saved = None
        cos = torch.empty((B, C) if self.save_logits else (1, 1), dtype=op, device=x.device)
        # with sub-centers the saved cosines are each class's largest, and this its row (1 byte a
        # logit, where recomputing it in the backward would redo the K products)
        arg = torch.empty((B, C) if self.save_logits and K > 1 else (1, 1), dtype=torch.int8, device=x.device)
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
            arg,
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
            K=K,
            OPK=_OPK[op],
            EVEN_D=D % _BD == 0,
            TMA=tma,
        )
        if self.save_logits:
            self._saved = (self._saved_key(xn, weight, labels), cos, arg)
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
        target_rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        op, x, wn = self._inputs(xn, weight, rw)
        tma = self._uses_tma(x.device)
        thr, t, hard = self._hard(thr, t)
        B, D = x.shape
        K = self.subcenters
        C = wn.shape[0] // K
        # the saved cosines, when they are this forward's (another forward in between: recompute)
        saved = self._saved if self._saved and self._saved[0] == self._saved_key(xn, weight, labels) else None
        self._saved = None
        cos, arg = (
            saved[1:]
            if saved
            else (torch.empty((1, 1), dtype=dt, device=x.device) for dt in (op, torch.int8))
        )
        # chunk classes: G holds K columns a class (sub-center k's at k ck + local), B K x chunk in all
        ck_max = self.chunk or default_chunk(B * K, C, torch.finfo(op).bits // 8, saved is not None)
        gbuf = torch.empty((B, ck_max * K), dtype=op, device=x.device)
        target_rows = labels if target_rows is None else target_rows
        dx = torch.zeros((B, D), dtype=torch.float32, device=x.device)
        dw = torch.empty(weight.shape, dtype=gradient_dtype(weight), device=weight.device)
        rows = (
            labels.to(torch.int32),
            thr,
            (lse.float() * LOG2E).contiguous(),
            (g.float() * s).contiguous(),
            dcy.float().contiguous(),
            target_rows.to(torch.int32),
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
                arg,
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
                K=K,
                KP=triton.next_power_of_2(K),
                OPK=_OPK[op],
                EVEN_D=D % _BD == 0,
                TMA=tma,
            )
            for k in range(K):  # cuBLAS: the sum over classes (sub-center k's rows: every K-th)
                mm_f32(gbuf[:, k * ck : (k + 1) * ck], wn[c0 * K + k : (c0 + ck) * K : K], out=dx)
        fix_target_terms(xn, x, weight, rw, target_rows, dcy, dx, dw, normalized=True)
        return dx.to(xn.dtype), dw
