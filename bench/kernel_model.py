"""What each fused-head kernel does at a shape, and a model of the step's time built from it.

The one place to update when heads/fused.py changes its launch structure is `WORK` below: one small
function per kernel name (the name is the Triton function's, less `_` and `_kernel`: `_fwd_kernel`
-> "fwd"), plus `LIBRARY` for the step's work outside Triton (the cuBLAS product dX += G W and the
W chunk's cast to the operand dtype). Each function reads the code's own launch structure -- grid,
loop trip counts, which operand each loop re-reads -- and returns a `Work`:

- `args`: every kernel argument at this shape, pointers as `Buf(dtype, shape)` (bench/kernels.py
  compiles from them ahead of time and allocates them to time the kernel on a GPU);
- `grid`, `launches` (per step: the backward launches once per class chunk);
- `flops`: the tensor-core flops of the step's launches;
- `elems`, `tile`: the elements the epilogue handles per step (logits, or dW elements) and per trip
  of the loop around the MMA loop (bench/kernels.py divides the epilogue's SASS count by it);
- `streams`: each operand as the loop nest touches it: its distinct bytes, how many times each byte
  is read, and `live`, the bytes that must stay in L2 between two reads of the same byte.

The model (`predict`), per Work, all per step:
- HBM bytes: every stream's distinct bytes once, plus the re-reads that miss; L2 bytes: the re-reads
  that hit, a fraction min(1, L2_SHARE x L2 / live) of them (all when the working set fits, a share
  when it does not). Writes are HBM bytes (write-back), except the kept fraction of a stream marked
  `stays` (G, and the W chunk's cast copy: read back by the next product).
- tensor time: flops at the arch's measured dense bf16 rate (fp16 the same), over the wave
  efficiency programs / (waves x resident programs);
- issue time: epilogue SASS instructions per element x elements / (SMs x 128 thread-instructions per
  clock x clock), over the same wave efficiency (an SM issues 4 warp-instructions per clock);
- compute = max(tensor, issue) when the epilogue can overlap the MMAs -- a wgmma left in flight
  (wait depth > 0) or two or more programs resident per SM (one issues its epilogue while another's
  MMAs run) -- else their sum; time = max(compute, HBM time, L2 time) + launches x LAUNCH_S.
The arch figures marked "assumed" (L2 bandwidth, clock, launch overhead) are what `bench/gpu_check.sh`'s
kernels stage calibrates: it prints predicted and measured times side by side.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

L2_SHARE = 0.75  # of the L2 a kernel's re-read working set may use and still hit (assumed)
LAUNCH_S = 4e-6  # per launch, host and tail together (assumed)


@dataclass(frozen=True)
class Arch:
    """One GPU: compile target and the limits and rates the model uses."""

    name: str
    cc: int  # compute capability as Triton's GPUTarget wants it (90, 80)
    gpu: str
    sms: int
    l2_bytes: float
    hbm_bps: float
    l2_bps: float  # assumed: L2 read bandwidth, to be calibrated
    mma_flops: float  # dense bf16 / fp16 with an fp32 accumulator
    clock_hz: float  # assumed: the clock under a tensor-core load
    smem_per_block: int  # the largest shared memory one block may ask for
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32


ARCHS = {
    "sm_90": Arch("sm_90", 90, "H200", 132, 60e6, 4.3e12, 10e12, 790e12, 1.755e9, 227 * 1024, 228 * 1024),
    "sm_80": Arch("sm_80", 80, "A100", 108, 40e6, 1.8e12, 5e12, 312e12, 1.41e9, 163 * 1024, 164 * 1024),
}


@dataclass(frozen=True)
class Shape:
    B: int
    D: int
    C: int


HEADLINE = Shape(512, 512, 1_000_000)
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "i64": 8, "i32": 4}


@dataclass(frozen=True)
class Buf:
    """A tensor argument: its dtype (Triton's name) and shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Stream:
    """An operand as a loop nest touches it: distinct bytes, reads of each byte, the L2 it needs."""

    name: str
    bytes: float
    reads: float = 1.0
    live: float = 0.0  # bytes that must stay in L2 between two reads of the same byte
    write: bool = False
    stays: bool = False  # a write the next kernels read back: kept in L2 when `live` fits
    fresh: bool = False  # a read of bytes the step's previous kernel just wrote (L2 when `live` fits)


@dataclass
class Work:
    """One kernel (or library call) of the step at a shape, as the code launches it."""

    grid: tuple[int, ...]
    launches: int
    flops: float
    streams: list[Stream]
    args: dict = field(default_factory=dict)
    elems: float = 0.0
    tile: int = 0

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


@dataclass(frozen=True)
class Config:
    """One kernel config as its triton.Config holds it: the constexpr tile sizes by name, and the
    launch shape. The descriptions read the fused kernels' tiles as bb, bc, bd (BB, BC, BD)."""

    tiles: tuple[tuple[str, int], ...]
    warps: int
    stages: int

    @property
    def kwargs(self) -> dict[str, int]:
        return dict(self.tiles)

    @property
    def bb(self) -> int:
        return self.kwargs["BB"]

    @property
    def bc(self) -> int:
        return self.kwargs["BC"]

    @property
    def bd(self) -> int:
        return self.kwargs["BD"]

    @property
    def tag(self) -> str:
        return "x".join(str(v) for _, v in self.tiles) + f"w{self.warps}s{self.stages}"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _chunk(s: Shape, op: str) -> int:
    from heads.fused import default_chunk

    return default_chunk(s.B, s.C, BYTES[op])


def _cos_streams(s: Shape, classes: int, cfg: Config, op: str, resident: int) -> list[Stream]:
    """`_cos_tile` swept over all batch tiles for every class tile: each program keeps one class
    tile's W rows (fp32 master, cast in registers) hot while it re-reads them for every batch tile,
    and re-reads all of X (operand dtype) for every class tile."""
    w_tile = cfg.bc * s.D * 4
    return [
        Stream("W", classes * s.D * 4, reads=_cdiv(s.B, cfg.bb), live=resident * w_tile),
        Stream("X", s.B * s.D * BYTES[op], reads=_cdiv(classes, cfg.bc), live=s.B * s.D * BYTES[op]),
    ]


def fwd(s: Shape, cfg: Config, op: str, arch: Arch, resident: int) -> Work:
    from heads.fused import COS_CONFIGS

    # FusedEngine._programs: 2 programs per SM, at most one per smallest class tile
    n_prog = max(1, min(2 * arch.sms, _cdiv(s.C, min(c.bc for c in COS_CONFIGS))))
    per = _cdiv(_cdiv(s.C, cfg.bc), n_prog)
    rows = n_prog * per * _cdiv(s.B, cfg.bb) * cfg.bb  # (class tile, batch tile) trips x rows
    f32 = Buf("fp32", (n_prog, s.B))
    args = dict(X=Buf(op, (s.B, s.D)), W=Buf("fp32", (s.C, s.D)), RW=Buf("fp32", (s.C,)),
                LAB=Buf("i64", (s.B,)), THR=Buf("fp32", (s.B,)), M=f32, L=f32, MX=f32, B=s.B, C=s.C,
                D=s.D, stride_x=s.D, stride_w=s.D, s=64.0, t=1.1, HARD=True, OPK=_OPK[op])
    streams = _cos_streams(s, s.C, cfg, op, min(resident, n_prog)) + [
        Stream("row partials", n_prog * s.B * 12, reads=2 * rows / (n_prog * s.B), live=n_prog * s.B * 12),
        Stream("LAB, THR", s.B * 12, reads=rows / s.B, live=s.B * 12),
    ]
    return Work((n_prog,), 1, 2.0 * s.B * s.C * s.D, streams, args, elems=s.B * s.C, tile=cfg.bb * cfg.bc)


def dlogit(s: Shape, cfg: Config, op: str, arch: Arch, resident: int) -> Work:
    ck = _chunk(s, op)
    launches = _cdiv(s.C, ck)
    grid = _cdiv(ck, cfg.bc)
    row = Buf("fp32", (s.B,))
    args = dict(X=Buf(op, (s.B, s.D)), W=Buf("fp32", (s.C, s.D)), RW=Buf("fp32", (s.C,)),
                LAB=Buf("i64", (s.B,)), THR=row, LSE=row, GR=row, DCY=row, G=Buf(op, (s.B, ck)),
                H=Buf("fp32", (ck,)), B=s.B, C=s.C, D=s.D, c0=0, ck=ck, stride_x=s.D, stride_w=s.D,
                stride_g=ck, s=64.0, t=1.1, HARD=True, OPK=_OPK[op])
    tiles = launches * grid
    streams = _cos_streams(s, s.C, cfg, op, min(resident, grid)) + [
        Stream("row inputs", s.B * 24, reads=tiles, live=s.B * 24),
        Stream("G", s.B * s.C * BYTES[op], write=True, stays=True, live=s.B * ck * BYTES[op]),
        Stream("H", s.C * 4, write=True),
    ]
    flops = 2.0 * s.B * s.C * s.D
    return Work((grid,), launches, flops, streams, args, elems=s.B * s.C, tile=cfg.bb * cfg.bc)


def dw(s: Shape, cfg: Config, op: str, arch: Arch, resident: int) -> Work:
    ck = _chunk(s, op)
    launches = _cdiv(s.C, ck)
    grid = (_cdiv(ck, cfg.bc), _cdiv(s.D, cfg.bd))
    args = dict(G=Buf(op, (s.B, ck)), X=Buf(op, (s.B, s.D)), W=Buf("fp32", (s.C, s.D)),
                RW=Buf("fp32", (s.C,)), H=Buf("fp32", (ck,)), DW=Buf("fp32", (s.C, s.D)), B=s.B, C=s.C,
                D=s.D, c0=0, ck=ck, stride_g=ck, stride_x=s.D, stride_w=s.D, stride_dw=s.D, OPK=_OPK[op])
    g_chunk = s.B * ck * BYTES[op]
    streams = [
        # each program reads its BC columns of G for all rows, once per D tile; X once per class tile
        Stream("G", s.B * s.C * BYTES[op], reads=grid[1], live=g_chunk, fresh=True),
        Stream("X", s.B * s.D * BYTES[op], reads=launches * grid[0], live=s.B * s.D * BYTES[op]),
        Stream("W (epilogue)", s.C * s.D * 4),
        Stream("DW", s.C * s.D * 4, write=True),
    ]
    return Work(grid, launches, 2.0 * s.B * s.C * s.D, streams, args, elems=s.C * s.D, tile=cfg.bc * cfg.bd)


def dx_product(s: Shape, op: str) -> Work:
    """FusedEngine.backward's `mm_f32(G, W[c0:c0+ck].to(op), out=dx)` per chunk: the cast reads the
    fp32 chunk and writes it in the operand dtype; cuBLAS reads G (from L2) and that copy."""
    ck = _chunk(s, op)
    launches = _cdiv(s.C, ck)
    w_op = s.C * s.D * BYTES[op]
    both = (ck * s.D + s.B * ck) * BYTES[op]  # the chunk's cast copy and G, in L2 together
    streams = [
        Stream("W (cast)", s.C * s.D * 4),
        Stream("W chunk (op)", w_op, write=True, stays=True, live=both),
        Stream("W chunk (op) read", w_op, fresh=True, live=both),
        Stream("G", s.B * s.C * BYTES[op], fresh=True, live=both),  # _dlogit wrote it
        Stream("dX", s.B * s.D * 4, reads=2 * launches, live=s.B * s.D * 4),
    ]
    return Work((1,), 2 * launches, 2.0 * s.B * s.C * s.D, streams)


_OPK = {"fp32": 0, "bf16": 1, "fp16": 2}
# kernel name -> its description; the step's Triton kernels in launch order
WORK: dict[str, Callable[[Shape, Config, str, Arch, int], Work]] = {"fwd": fwd, "dlogit": dlogit, "dw": dw}
LIBRARY: dict[str, Callable[[Shape, str], Work]] = {"dx (cuBLAS + W cast)": dx_product}


@dataclass
class Prediction:
    hbm_bytes: float
    l2_bytes: float
    tensor_s: float
    issue_s: float
    memory_s: float
    seconds: float
    bound: str


def _traffic(work: Work, arch: Arch) -> tuple[float, float]:
    """(HBM bytes, L2 bytes) of a step's work: first touches and writes go to HBM; re-reads (and
    reads of bytes the previous kernel just wrote, `fresh`; writes marked `stays`) hit L2 in the
    fraction min(1, L2 share / live) of the bytes they need kept there, and go to HBM otherwise."""
    hbm = l2 = 0.0
    for st in work.streams:
        hit = min(1.0, L2_SHARE * arch.l2_bytes / st.live) if st.live else 0.0
        if st.write:
            kept = st.bytes * (hit if st.stays else 0.0)
            hbm, l2 = hbm + st.bytes - kept, l2 + kept
        else:
            again = st.bytes * (st.reads - (0.0 if st.fresh else 1.0))  # the reads that may hit
            hbm += st.bytes * st.reads - again * hit
            l2 += again * hit
    return hbm, l2


def predict(work: Work, arch: Arch, per_elem: float = 0.0, blocks_per_sm: int = 1,
            in_flight: bool = False) -> Prediction:
    """The modelled seconds per step of one Work on one arch (see the module docstring)."""
    resident = arch.sms * max(1, blocks_per_sm)
    waves = _cdiv(work.programs, resident)
    efficiency = work.programs / (waves * resident) if work.programs > 1 else 1.0
    tensor = work.flops / arch.mma_flops / efficiency
    issue = per_elem * work.elems / (arch.sms * 128 * arch.clock_hz) / efficiency
    hbm, l2 = _traffic(work, arch)
    overlap = in_flight or blocks_per_sm >= 2
    parts = {"HBM": hbm / arch.hbm_bps, "L2": l2 / arch.l2_bps}
    serial = not overlap and issue > 0
    parts.update({"tensor+issue": tensor + issue} if serial else {"tensor": tensor, "issue": issue})
    bound = max(parts, key=parts.get)
    memory = max(parts["HBM"], parts["L2"])
    return Prediction(hbm, l2, tensor, issue, memory, parts[bound] + work.launches * LAUNCH_S, bound)


def floor_seconds(s: Shape, arch: Arch) -> float:
    """The bf16 floor: the three B x C x D products of a forward and backward (6 BCD flops)."""
    return 6.0 * s.B * s.C * s.D / arch.mma_flops
