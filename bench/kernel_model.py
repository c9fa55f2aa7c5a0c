"""What each fused-head kernel does at a shape, and a model of the step's time built from it.

The one place to update when heads/fused.py changes its launch structure is `WORK` below: one small
function per autotuned kernel (the name is the Triton function's, less `_` and `_kernel`: `_fwd_kernel`
-> "fwd"), plus `LIBRARY` for the forward's and backward's work outside the autotuned kernels (the
cuBLAS product dX += G Wn) and `STEP` for the head's optimizer step that follows (the gradient norm
the trainer reads every step, then heads.fused_step's one pass: SGD with momentum over the fp32
C x D weight and state, ~10 GB at C = 1M, as much time as the whole bf16 floor, which also makes the
next forward's Wn and inverse norms, so the forward has no normalize pass).
A `Shape` carries the mode: recompute (the backward recomputes the cosines, the default) or
save_logits (the forward writes them, the backward reads them), and the sub-centers per class K
(`subcenters`: W holds C K rows; every product, Wn, G and dW scale with K, the logits do not).
Each function reads the code's own launch structure -- grid, loop trip counts, which operand each
loop re-reads -- and returns a `Work`:

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
  `stays` (G: read back by the backward's phase 2 and the dX product).
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
    """The step: its sizes, whether the forward keeps the B x C cosines for the backward
    (FusedEngine(save_logits=True)) instead of the backward recomputing them, the sub-centers
    per class (K: W has C K rows), and the dtype the backward writes dW in and the step reads."""

    B: int
    D: int
    C: int
    save_logits: bool = False
    subcenters: int = 1
    grad: str = "fp32"  # the head weight's gradient (weight.grad_dtype): fp32, or bf16 (half the bytes)

    @property
    def rows(self) -> int:
        """Rows of W (and Wn, dW): C K."""
        return self.C * self.subcenters


HEADLINE = Shape(512, 512, 1_000_000)
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "i64": 8, "i32": 4, "i8": 1}


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
    tma: bool = False  # as heads.fused.TileConfig's flags (`configs_for` reads them)
    one_row: bool = False

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
    def slab(self) -> int:
        """The backward's phase-2 slab in BD columns (SLAB)."""
        return self.kwargs.get("SLAB", 2)

    @property
    def tag(self) -> str:
        return "x".join(str(v) for _, v in self.tiles) + f"w{self.warps}s{self.stages}"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _chunk(s: Shape, op: str) -> int:
    from heads.fused import default_chunk

    return default_chunk(s.B * s.subcenters, s.C, BYTES[op], s.save_logits)  # G: B x K chunk


def _wn_x_streams(
    s: Shape, cfg: Config, op: str, resident: int, w_reads: float, x_passes: int
) -> list[Stream]:
    """Wn and X as `_cos_tile`'s sweeps touch them: each program keeps its class tile's Wn rows
    (16-bit; K rows a class) hot while it re-reads them `w_reads` times (once per batch tile, and
    again in an epilogue), and reads all of X (operand dtype) `x_passes` times per class tile."""
    live = resident * cfg.bc * s.subcenters * s.D * BYTES[op]
    return [
        Stream("Wn", s.rows * s.D * BYTES[op], reads=w_reads, live=live),
        Stream("X", s.B * s.D * BYTES[op], reads=x_passes * _cdiv(s.C, cfg.bc), live=s.B * s.D * BYTES[op]),
    ]


def fwd(s: Shape, cfg: Config, op: str, arch: Arch, resident: int) -> Work:
    """`_fwd_kernel`: n_prog programs, each a contiguous range of class tiles; per class tile every
    batch tile: the cosine tile (MMA loop over D; K of them with sub-centers, X re-read for each),
    then the online log-sum-exp whose 3 row partials it reads and writes per trip. With save_logits
    it also writes the B x C cosines (and with sub-centers each class's argmax row, 1 byte a logit;
    read back by the backward much later: from memory)."""
    from heads.fused import FWD_CONFIGS

    # FusedEngine._programs: 2 programs per SM, at most one per smallest class tile
    n_prog = max(1, min(2 * arch.sms, _cdiv(s.C, min(c.bc for c in FWD_CONFIGS))))
    per = _cdiv(_cdiv(s.C, cfg.bc), n_prog)
    rows = n_prog * per * _cdiv(s.B, cfg.bb) * cfg.bb  # (class tile, batch tile) trips x rows
    f32 = Buf("fp32", (n_prog, s.B))
    z = (s.B, s.C) if s.save_logits else (1, 1)
    K = s.subcenters
    args = dict(
        X=Buf(op, (s.B, s.D)),
        WN=Buf(op, (s.rows, s.D)),
        LAB=Buf("i32", (s.B,)),
        THR=Buf("fp32", (s.B,)),
        M=f32,
        L=f32,
        MX=f32,
        Z=Buf(op, z),
        ZA=Buf("i8", z if K > 1 else (1, 1)),
        B=s.B,
        C=s.C,
        D=s.D,
        stride_x=s.D,
        stride_w=s.D,
        stride_z=z[1],
        s2=64.0 * _LOG2E,
        t=1.1,
        HARD=True,
        SAVE=s.save_logits,
        K=K,
        OPK=_OPK[op],
        EVEN_D=s.D % cfg.bd == 0,
        TMA=arch.cc >= 90,
    )
    streams = _wn_x_streams(s, cfg, op, min(resident, n_prog), _cdiv(s.B, cfg.bb), K) + [
        Stream("row partials", n_prog * s.B * 12, reads=2 * rows / (n_prog * s.B), live=n_prog * s.B * 12),
        Stream("LAB, THR", s.B * 8, reads=rows / s.B, live=s.B * 8),
    ]
    if s.save_logits:
        streams.append(Stream("cosines (saved)", s.B * s.C * BYTES[op], write=True))
        if K > 1:
            streams.append(Stream("argmax rows (saved)", s.B * s.C, write=True))
    flops = 2.0 * s.B * s.rows * s.D
    return Work((n_prog,), 1, flops, streams, args, elems=s.B * s.C, tile=cfg.bb * cfg.bc)


def bwd(s: Shape, cfg: Config, op: str, arch: Arch, resident: int) -> Work:
    """`_bwd_kernel`, once per chunk of ck classes, one program per class tile. Phase 1, per batch tile:
    the cosine tile (recomputed: Wn tile and X re-read; or the saved cosines read from memory), G =
    dL/dcos written into the B x ck block (it stays in L2 for phase 2 and the dX product), h in
    registers. Phase 2, per D slab (2 BD wide): dW tile = G^T X over the batch (the program's G columns
    re-read once per slab, from L2; X once more per class tile), the Wn tile in the epilogue, dW written
    in the gradient's dtype (`Shape.grad`: fp32, or bf16). With K sub-centers: phase 1 K cosine tiles
    (their max and argmax), G K columns a class (zero but at the argmax), phase 2 once per sub-center
    row. Epilogue SASS (bench/kernels.py's first MMA loop's surround): per logit of phase 1 when it
    recomputes; per dW element of phase 2 with saved cosines (phase 1 then has no MMA loop and its
    per-logit instructions are not counted)."""
    ck_max = _chunk(s, op)
    ck = min(ck_max, s.C)  # FusedEngine.backward: the last chunk may be shorter
    launches = _cdiv(s.C, ck_max)
    grid = _cdiv(ck, cfg.bc)
    row = Buf("fp32", (s.B,))
    z = (s.B, s.C) if s.save_logits else (1, 1)
    K = s.subcenters
    args = dict(
        X=Buf(op, (s.B, s.D)),
        WN=Buf(op, (s.rows, s.D)),
        RW=Buf("fp32", (s.rows,)),
        LAB=Buf("i32", (s.B,)),
        THR=row,
        LSE2=row,
        GS=row,
        DCY=row,
        Z=Buf(op, z),
        ZA=Buf("i8", z if K > 1 else (1, 1)),
        G=Buf(op, (s.B, ck_max * K)),
        DW=Buf(s.grad, (s.rows, s.D)),
        TROW=Buf("i32", (s.B,)),
        B=s.B,
        D=s.D,
        c0=0,
        ck=ck,
        stride_x=s.D,
        stride_w=s.D,
        stride_z=z[1],
        stride_g=ck_max * K,
        stride_dw=s.D,
        s2=64.0 * _LOG2E,
        t=1.1,
        HARD=True,
        SAVED=s.save_logits,
        K=K,
        KP=1 << (K - 1).bit_length(),
        OPK=_OPK[op],
        EVEN_D=s.D % cfg.bd == 0,
        TMA=arch.cc >= 90,
    )
    tiles = launches * grid  # class tiles over the step
    g_bytes = s.B * s.rows * BYTES[op]
    resident = min(resident, grid)
    if s.save_logits:  # Wn only in phase 2's epilogue, X only in phase 2 (once per sub-center)
        streams = _wn_x_streams(s, cfg, op, resident, 1, K) + [
            Stream("cosines (saved)", s.B * s.C * BYTES[op])
        ]
        if K > 1:
            streams.append(Stream("argmax rows (saved)", s.B * s.C))
    else:  # Wn once per batch tile and in the epilogue; X in both phases, per sub-center
        streams = _wn_x_streams(s, cfg, op, resident, _cdiv(s.B, cfg.bb) + 1, 2 * K)
    streams += [
        Stream("row inputs", s.B * 20, reads=tiles, live=s.B * 20),
        Stream("RW", s.rows * 4),
        Stream("G", g_bytes, write=True, stays=True, live=s.B * ck * K * BYTES[op]),
        Stream(
            "G (phase 2)",
            g_bytes,
            reads=_cdiv(s.D, cfg.slab * cfg.bd),
            fresh=True,
            live=resident * s.B * cfg.bc * BYTES[op],
        ),
        Stream("DW", s.rows * s.D * BYTES[s.grad], write=True),
    ]
    products = 1 if s.save_logits else 2
    if s.save_logits:
        elems, tile = s.rows * s.D, cfg.bc * cfg.slab * cfg.bd
    else:
        elems, tile = s.B * s.C, cfg.bb * cfg.bc
    flops = products * 2.0 * s.B * s.rows * s.D
    return Work((grid,), launches, flops, streams, args, elems=elems, tile=tile)


def dx_product(s: Shape, op: str, arch: Arch) -> Work:
    """FusedEngine.backward's `mm_f32(G, Wn[c0:c0+ck], out=dx)` per chunk (per sub-center with K > 1:
    its rows of the chunk): cuBLAS reads G and the Wn chunk (both just read by _bwd_kernel: from L2 as
    far as the two fit) and accumulates into the fp32 dX, one torch.addmm(out_dtype=float32) launch
    each (where the torch build refuses an fp32 sum with 16-bit operands, heads.core falls back to a
    product and an add: two)."""
    K = s.subcenters
    ck = _chunk(s, op)
    launches = _cdiv(s.C, ck) * K
    both = (ck * s.D + s.B * ck) * K * BYTES[op]  # the Wn chunk and G, in L2 together
    streams = [
        Stream("Wn chunk", s.rows * s.D * BYTES[op], fresh=True, live=both),
        Stream("G", s.B * s.rows * BYTES[op], fresh=True, live=both),  # _bwd_kernel wrote it
        Stream("dX", s.B * s.D * 4, reads=launches, live=s.B * s.D * 4),
    ]
    return Work((1,), launches, 2.0 * s.B * s.rows * s.D, streams)


def grad_norm(s: Shape, op: str, arch: Arch) -> Work:
    """The trainer's `head_parallel.clip_grad_norm`, every step (the divergence guard reads the norm
    even with clipping off): one norm reads the C x D head gradient once (fp32 or bf16). The clip's
    multiply by min(1, max / norm) is none with clipping off, and folded into the fused SGD pass with
    it on (FusedHeadSGD.defer_grad_scale)."""
    return Work((1,), 1, 0.0, [Stream(f"dW ({s.grad})", s.rows * s.D * BYTES[s.grad])])


def sgd_step(s: Shape, op: str, arch: Arch) -> Work:
    """heads.fused_step's `_sgd_step_kernel` (FusedHeadSGD, the trainer's SGD, with the fused engine):
    one pass, `normalize_block(D)` whole rows a program, reads W and the momentum (fp32) and dW (fp32
    or bf16; times the clip's factor as it reads it: no clip pass), writes W and the momentum, and
    from the new W in registers the inverse norms and Wn (operand dtype) that the next forward reads
    (so no normalize pass: 22 bytes per element, 20 with a bf16 dW, against torch's foreach SGD's 44,
    the clip's multiply's 8 and the normalize pass's 6)."""
    from heads.fused import normalize_block

    n = s.rows * s.D * 4
    streams = [
        Stream("W, momentum (fp32)", 2 * n),
        Stream(f"dW ({s.grad})", s.rows * s.D * BYTES[s.grad]),
        Stream("W, momentum (written)", 2 * n, write=True),
        Stream("Wn", s.rows * s.D * BYTES[op], write=True),
        Stream("RW", s.rows * 4, write=True),
    ]
    br, bd = normalize_block(s.D)
    big = Buf("fp32", (s.rows, s.D))
    # the trainer's defaults, clipping on: every branch but Nesterov's
    args = dict(
        W=big,
        GRAD=Buf(s.grad, (s.rows, s.D)),
        SCALE=Buf("fp32", (1,)),
        BUF=big,
        RW=Buf("fp32", (s.rows,)),
        WN=Buf(op, (s.rows, s.D)),
    )
    args.update(C=s.rows, D=s.D, lr=0.1, wd=5e-4, momentum=0.9, keep=1.0)
    args.update(SCALED=True, DECAY=True, MOMENTUM=True, FIRST=False, NESTEROV=False, BR=br, BD=bd)
    return Work((_cdiv(s.rows, br),), 1, 0.0, streams, args)


_OPK = {"fp32": 0, "bf16": 1, "fp16": 2}
_LOG2E = 1.0 / math.log(2.0)
# kernel name -> its description; the step's Triton kernels in launch order
WORK: dict[str, Callable[[Shape, Config, str, Arch, int], Work]] = {"fwd": fwd, "bwd": bwd}
# the forward's and backward's work outside the autotuned kernels, in launch order
LIBRARY: dict[str, Callable[[Shape, str, Arch], Work]] = {
    "dx (cuBLAS addmm into fp32 dX)": dx_product,
}
# the head's optimizer step after the backward (the trainer's order: the gradient's norm, then SGD)
STEP: dict[str, Callable[[Shape, str, Arch], Work]] = {
    "grad norm (torch, for the clip and the guard)": grad_norm,
    "SGD step + Wn, r (Triton, fused)": sgd_step,
}


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


def predict(
    work: Work, arch: Arch, per_elem: float = 0.0, blocks_per_sm: int = 1, in_flight: bool = False
) -> Prediction:
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
    """The bf16 floor: the three B x C K x D products of a forward and backward (6 BCKD flops)."""
    return 6.0 * s.B * s.rows * s.D / arch.mma_flops
