"""Triton kernels for the blocked algorithm, on the tensor cores: the class products read fp16 (or
bf16) operands, cast while loading from whatever X and the fp32 master W arrive in, and accumulate
in fp32 (`heads.core.operand_dtype`; fp32 operands in the interpreter, whose bf16 dot is wrong).

Forward (`_fwd_kernel`): program p owns a contiguous range of class tiles and sweeps every batch
tile for each, keeping an online log-sum-exp and the best non-target cosine per row. Its partials
(3 floats per row per program) are combined on the host in a fixed order. W streams from memory once.

Backward, per chunk of `chunk` classes (sized so its B x chunk gradient block mostly stays in L2):
1. `_dlogit_kernel`: one program per class tile recomputes the tile's cosines over all batch tiles
   and writes G = dL/dcos * r (B x chunk, operand dtype) and h_j = sum_i dL/dcos_ij cos_ij (fp32,
   kept in registers across the batch: no partials);
2. dX += G @ W_chunk: one cuBLAS product with an fp32 result (the reduction over classes that a
   class-parallel kernel would have to pass through memory per tile);
3. `_dw_kernel`: dW_chunk = G^T X - (r^2 h) W_chunk, tiles over (classes, D), written straight into
   the C x D gradient in W's dtype; that buffer is handed to autograd as weight.grad.
No atomics anywhere: for a fixed set of kernel configs the result is bitwise reproducible.

Configs: a few per kernel (below), pruned by the device's shared memory, autotuned on CUDA by Triton
keyed on (B, D) and the tensors' dtypes. `deterministic=True` skips the tuner and uses each kernel's
first config: bitwise the same result in every process on a given GPU model. The tuned default
picks by timing, so two processes may pick different tiles and differ in the last bits (never more
than the fp32 accumulation order). Memory beyond W and dW: forward 12 bytes x B x programs; backward
G (B x chunk, 2 bytes: 32 MiB at B=512), one W chunk in the operand dtype (chunk x D: 32 MiB at
D=512), h and dX; nothing grows with C.
"""

from __future__ import annotations

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
# do not fit a smaller card are pruned. The first of each list is the deterministic mode's choice.
# forward and _dlogit: (BB x BD) X tiles and (BC x BD) W tiles (fp32, cast in registers) per stage
COS_CONFIGS = (
    TileConfig(64, 128, 64, 4, 3),
    TileConfig(128, 128, 64, 8, 3),
    TileConfig(128, 64, 64, 4, 4),
    TileConfig(64, 64, 64, 4, 2),
)
# _dw_kernel: output tile (BC classes x BD dims), stepping BB batch rows per stage
DW_CONFIGS = (
    TileConfig(64, 128, 128, 8, 3),
    TileConfig(64, 128, 64, 4, 3),
    TileConfig(64, 64, 128, 4, 4),
    TileConfig(64, 64, 64, 4, 2),
)


def shared_bytes(cfg: TileConfig, kernel: str, x_bytes: int, w_bytes: int, g_bytes: int) -> int:
    """Shared memory a config's software pipeline needs: `stages` copies of the tiles it streams."""
    if kernel == "dw":
        per_stage = cfg.bb * cfg.bc * g_bytes + cfg.bb * cfg.bd * x_bytes
    else:
        per_stage = cfg.bb * cfg.bd * x_bytes + cfg.bc * cfg.bd * w_bytes
    return cfg.stages * per_stage


def fitting(configs: tuple[TileConfig, ...], kernel: str, limit: int, x_bytes: int, w_bytes: int,
            g_bytes: int) -> list[TileConfig]:
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
        g = size.get("G", size.get("X", 2))
        mine = tuple(by_kwargs[tuple(sorted(tc.kwargs.items()))] for tc in tconfigs)
        keep = set(fitting(mine, kernel, _smem_limit(), size.get("X", 2), size.get("W", 4), g))
        return [tc for tc, c in zip(tconfigs, mine) if c in keep]

    return prune


if triton is not None:

    @triton.jit
    def _as_op(v, OPK: tl.constexpr):
        # the operand dtype: 0 fp32, 1 bf16, 2 fp16
        if OPK == 1:
            return v.to(tl.bfloat16)
        elif OPK == 2:
            return v.to(tl.float16)
        else:
            return v.to(tl.float32)

    @triton.jit
    def _mma(a, b, acc, OPK: tl.constexpr):
        if OPK == 0:
            return tl.dot(a, b, acc, input_precision="ieee")  # exact fp32 (the interpreter, tests)
        else:
            return tl.dot(a, b, acc)  # bf16/fp16 on the tensor cores, fp32 accumulator

    @triton.jit
    def _cos_tile(X, W, RW, rows, cols, rmask, cmask, D, stride_x, stride_w,
                  BB: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, OPK: tl.constexpr):
        acc = tl.zeros((BB, BC), dtype=tl.float32)
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            dmask = ds < D
            x = tl.load(X + rows[:, None] * stride_x + ds[None, :], mask=rmask[:, None] & dmask[None, :],
                        other=0.0)
            w = tl.load(W + cols[:, None] * stride_w + ds[None, :], mask=cmask[:, None] & dmask[None, :],
                        other=0.0)
            acc = _mma(_as_op(x, OPK), tl.trans(_as_op(w, OPK)), acc, OPK)
        rw = tl.load(RW + cols, mask=cmask, other=0.0)
        return acc * rw[None, :]

    @triton.jit
    def _sv_logit(cos, thr, s, t, HARD: tl.constexpr):
        # SV-Softmax: hard negatives (cos > psi of the row) get s (t cos + t - 1)
        if HARD:
            return tl.where(cos > thr[:, None], s * (t * cos + (t - 1.0)), s * cos)
        else:
            return s * cos

    @triton.jit
    def _fwd_kernel(X, W, RW, LAB, THR, M, L, MX, B, C, D, stride_x, stride_w, s, t,
                    HARD: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
                    OPK: tl.constexpr):
        pid = tl.program_id(0)
        per = tl.cdiv(tl.cdiv(C, BC), tl.num_programs(0))  # class tiles per program
        for i in range(0, per):
            # int64: row offsets cols * stride_w pass 2^31 (int32 wraps) once C * D >= 2^31
            cols = ((pid * per + i) * BC + tl.arange(0, BC)).to(tl.int64)
            cmask = cols < C
            for b0 in range(0, B, BB):
                rows = b0 + tl.arange(0, BB)
                rmask = rows < B
                cos = _cos_tile(X, W, RW, rows, cols, rmask, cmask, D, stride_x, stride_w, BB, BC, BD, OPK)
                lab = tl.load(LAB + rows, mask=rmask, other=-1)
                thr = tl.load(THR + rows, mask=rmask, other=0.0)
                valid = cmask[None, :] & (cols[None, :] != lab[:, None])
                logit = tl.where(valid, _sv_logit(cos, thr, s, t, HARD), float("-inf"))
                off = pid * B + rows
                # the partials start at i = 0: the kernel never reads what it did not write (so the
                # autotuner may rerun it on the same buffers)
                seen = rmask & (i > 0)
                m_old = tl.load(M + off, mask=seen, other=-1e30)
                l_old = tl.load(L + off, mask=seen, other=0.0)
                mx_old = tl.load(MX + off, mask=seen, other=-2.0)
                m_new = tl.maximum(m_old, tl.max(logit, axis=1))
                l_new = l_old * tl.exp(m_old - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), axis=1)
                mx_new = tl.maximum(mx_old, tl.max(tl.where(valid, cos, -2.0), axis=1))
                tl.store(M + off, m_new, mask=rmask)
                tl.store(L + off, l_new, mask=rmask)
                tl.store(MX + off, mx_new, mask=rmask)

    @triton.jit
    def _dlogit_kernel(X, W, RW, LAB, THR, LSE, GR, DCY, G, H, B, C, D, c0, ck, stride_x, stride_w,
                       stride_g, s, t, HARD: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr,
                       BD: tl.constexpr, OPK: tl.constexpr):
        local = tl.program_id(0) * BC + tl.arange(0, BC)  # column in this chunk
        lmask = local < ck
        cols = (c0 + local).to(tl.int64)
        cmask = lmask & (cols < C)
        rw = tl.load(RW + cols, mask=cmask, other=0.0)
        h = tl.zeros((BC,), dtype=tl.float32)
        for b0 in range(0, B, BB):
            rows = b0 + tl.arange(0, BB)
            rmask = rows < B
            cos = _cos_tile(X, W, RW, rows, cols, rmask, cmask, D, stride_x, stride_w, BB, BC, BD, OPK)
            lab = tl.load(LAB + rows, mask=rmask, other=-1)
            thr = tl.load(THR + rows, mask=rmask, other=0.0)
            lse = tl.load(LSE + rows, mask=rmask, other=0.0)
            g = tl.load(GR + rows, mask=rmask, other=0.0)
            dcy = tl.load(DCY + rows, mask=rmask, other=0.0)
            scale = tl.zeros((BB, BC), dtype=tl.float32) + (s * g)[:, None]
            if HARD:
                scale = tl.where(cos > thr[:, None], scale * t, scale)
            dc = tl.exp(_sv_logit(cos, thr, s, t, HARD) - lse[:, None]) * scale
            dc = tl.where(cols[None, :] == lab[:, None], dcy[:, None], dc)
            dc = tl.where(rmask[:, None] & cmask[None, :], dc, 0.0)
            h += tl.sum(dc * cos, axis=0)
            gp = G + rows[:, None] * stride_g + local[None, :]
            tl.store(gp, (dc * rw[None, :]).to(G.dtype.element_ty), mask=rmask[:, None] & lmask[None, :])
        tl.store(H + local, h, mask=lmask)

    @triton.jit
    def _dw_kernel(G, X, W, RW, H, DW, B, C, D, c0, ck, stride_g, stride_x, stride_w, stride_dw,
                   BB: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, OPK: tl.constexpr):
        local = tl.program_id(0) * BC + tl.arange(0, BC)
        lmask = local < ck
        cols = (c0 + local).to(tl.int64)
        cmask = lmask & (cols < C)
        ds = tl.program_id(1) * BD + tl.arange(0, BD)
        dmask = ds < D
        acc = tl.zeros((BC, BD), dtype=tl.float32)
        for b0 in range(0, B, BB):
            rows = b0 + tl.arange(0, BB)
            rmask = rows < B
            g = tl.load(G + rows[:, None] * stride_g + local[None, :], mask=rmask[:, None] & lmask[None, :],
                        other=0.0)
            x = tl.load(X + rows[:, None] * stride_x + ds[None, :], mask=rmask[:, None] & dmask[None, :],
                        other=0.0)
            acc = _mma(tl.trans(_as_op(g, OPK)), _as_op(x, OPK), acc, OPK)
        # d c_ij / d w_j = r_j (xn_i - c_ij r_j w_j): the normalization's projection, as an epilogue
        rw = tl.load(RW + cols, mask=cmask, other=0.0)
        h = tl.load(H + local, mask=lmask, other=0.0)
        wm = cmask[:, None] & dmask[None, :]
        w = tl.load(W + cols[:, None] * stride_w + ds[None, :], mask=wm, other=0.0).to(tl.float32)
        dw = acc - (rw * rw * h)[:, None] * w
        tl.store(DW + cols[:, None] * stride_dw + ds[None, :], dw.to(DW.dtype.element_ty), mask=wm)

    def _autotuned(kernel, configs: tuple[TileConfig, ...], kind: str):
        prune = {"early_config_prune": _pruner(kind, configs)}
        return triton.autotune(_to_triton(configs), key=["B", "D"], prune_configs_by=prune)(kernel)

    _fwd_tuned = _autotuned(_fwd_kernel, COS_CONFIGS, "cos")
    _dlogit_tuned = _autotuned(_dlogit_kernel, COS_CONFIGS, "cos")
    _dw_tuned = _autotuned(_dw_kernel, DW_CONFIGS, "dw")

_OPK = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def kernel_report(compiled, config) -> dict:
    """Registers and spills of a compiled kernel (None in the interpreter), and its config."""
    return {"config": str(config), "n_regs": getattr(compiled, "n_regs", None),
            "n_spills": getattr(compiled, "n_spills", None)}


def default_chunk(B: int, C: int, g_bytes: int) -> int:
    """Classes per backward chunk: a power of two whose B x chunk gradient block is at most 32 MiB
    (it mostly stays in the 50-60 MB L2 between the kernel that writes it and the two products that
    read it; fewer, larger chunks keep the 4 launches per chunk from making the pass launch-bound)."""
    fit = max(1, (32 << 20) // max(1, B * g_bytes))
    chunk = 1 << (fit.bit_length() - 1)
    return max(1024, min(65536, chunk, triton.next_power_of_2(C) if triton else C))


class FusedEngine:
    """Launches the kernels. `deterministic=True`: each kernel's first config, no autotuning (bitwise
    reproducible across processes). `configs` ({"fwd"|"dlogit"|"dw": TileConfig}) pins configs (tests);
    `operands` as `heads.core.operand_dtype`; `chunk` classes per backward chunk; `programs` the
    forward's program count (default 2 per SM). `kernels` holds the last launch of each kernel:
    config, registers and spills."""

    def __init__(self, deterministic: bool = False, configs: dict[str, TileConfig] | None = None,
                 operands: str = "auto", chunk: int | None = None, programs: int | None = None) -> None:
        if triton is None:
            raise RuntimeError("impl='fused' needs triton; use impl='chunked'")
        self.deterministic = deterministic
        self.configs = dict(configs or {})
        self.operands = operands
        self.chunk = chunk
        self.programs = programs
        self.kernels: dict[str, dict] = {}

    def _check(self, t: Tensor) -> None:
        if t.device.type != "cuda" and not _interpreting():
            raise RuntimeError("impl='fused' needs a CUDA device, or TRITON_INTERPRET=1 set before triton "
                               "is imported; use impl='chunked' (or 'auto') on the CPU")
        if t.dtype == torch.float64:
            raise RuntimeError("impl='fused' computes in fp32; float64 is for the reference and chunked")

    def operand_dtype(self, xn: Tensor) -> torch.dtype:
        return operand_dtype(xn.device, xn.dtype, _interpreting(), self.operands)

    def _launch(self, name: str, plain, tuned, configs: tuple[TileConfig, ...], grid, device: torch.device,
                *args, **const) -> None:
        tune = device.type == "cuda" and not _interpreting() and not self.deterministic
        if tune and name not in self.configs:
            with _on(device):
                compiled = tuned[grid](*args, **const)
            cfg = tuned.best_config
        else:
            cfg = self.configs.get(name, configs[0])
            with _on(device):
                compiled = plain[grid](*args, **const, **cfg.kwargs(), num_warps=cfg.warps,
                                       num_stages=cfg.stages)
        self.kernels[name] = kernel_report(compiled, cfg)

    def _programs(self, C: int, device: torch.device) -> int:
        if self.programs is not None:
            want = self.programs
        elif device.type == "cuda":
            want = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        else:
            want = 2
        return max(1, min(want, triton.cdiv(C, min(c.bc for c in COS_CONFIGS))))

    def forward(self, xn: Tensor, weight: Tensor, rw: Tensor, labels: Tensor, thr: Tensor,
                s: float, t: float) -> tuple[Tensor, Tensor]:
        self._check(xn)
        op = self.operand_dtype(xn)
        x, weight = xn.to(op).contiguous(), weight.contiguous()
        B, D = x.shape
        C = weight.shape[0]
        n_prog = self._programs(C, x.device)
        m, l_, mx = (torch.empty((n_prog, B), device=x.device) for _ in range(3))
        self._launch("fwd", _fwd_kernel, _fwd_tuned, COS_CONFIGS, (n_prog,), x.device,
                     x, weight, rw, labels, thr.float().contiguous(), m, l_, mx, B, C, D, x.stride(0),
                     weight.stride(0), float(s), float(t), HARD=t != 1.0, OPK=_OPK[op])
        top = m.amax(0)
        lse = top + torch.log((l_ * torch.exp(m - top)).sum(0))
        return lse, mx.amax(0)

    def backward(self, xn: Tensor, weight: Tensor, rw: Tensor, labels: Tensor, thr: Tensor, lse: Tensor,
                 g: Tensor, dcy: Tensor, s: float, t: float) -> tuple[Tensor, Tensor]:
        op = self.operand_dtype(xn)
        x, weight = xn.to(op).contiguous(), weight.contiguous()
        B, D = x.shape
        C = weight.shape[0]
        ck_max = self.chunk or default_chunk(B, C, torch.finfo(op).bits // 8)
        gbuf = torch.empty((B, ck_max), dtype=op, device=x.device)
        hbuf = torch.empty((ck_max,), dtype=torch.float32, device=x.device)
        dx = torch.zeros((B, D), dtype=torch.float32, device=x.device)
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        rows = (thr.float().contiguous(), lse.float().contiguous(), g.float().contiguous(),
                dcy.float().contiguous())
        for c0 in range(0, C, ck_max):
            ck = min(ck_max, C - c0)
            self._launch("dlogit", _dlogit_kernel, _dlogit_tuned, COS_CONFIGS,
                         lambda meta, ck=ck: (triton.cdiv(ck, meta["BC"]),), x.device,
                         x, weight, rw, labels, *rows, gbuf, hbuf, B, C, D, c0, ck, x.stride(0),
                         weight.stride(0), gbuf.stride(0), float(s), float(t), HARD=t != 1.0, OPK=_OPK[op])
            mm_f32(gbuf[:, :ck], weight[c0:c0 + ck].to(op), out=dx)  # cuBLAS: the sum over classes
            self._launch("dw", _dw_kernel, _dw_tuned, DW_CONFIGS,
                         lambda meta, ck=ck: (triton.cdiv(ck, meta["BC"]), triton.cdiv(D, meta["BD"])),
                         x.device,
                         gbuf, x, weight, rw, hbuf, dw, B, C, D, c0, ck, gbuf.stride(0), x.stride(0),
                         weight.stride(0), dw.stride(0), OPK=_OPK[op])
        fix_target_terms(xn, x, weight, rw, labels, dcy, dx, dw)
        return dx.to(xn.dtype), dw
