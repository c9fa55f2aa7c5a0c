"""Compile every fused-head kernel ahead of time, for a GPU that need not be here, and read what the
compiler made of it; beside it, a model of the step's time at the headline shape.

    python -m bench.kernels --out DIR [--arch sm_90,sm_80] [--dtypes fp16,bf16] [--configs all|first]
                            [--subcenters K] [--grad-dtype fp32|bf16] [--time]

Kernels: every autotuned Triton kernel in heads.fused (found by type, with the config list its tuner
holds); each needs its description in bench/kernel_model.py `WORK` (a missing one is one error line).
For each (kernel, mode, config, operand dtype, arch) at B=512, D=512, C=1,000,000 it writes
DIR/<kernel>[_saved]_<dtype>_<config>_<arch>.ptx and .cubin, and a row (mode: "recompute", the
backward recomputes the cosines, the default; "saved", FusedEngine(save_logits=True): the forward
writes them and the backward reads them; the SAVE/SAVED constexprs compile different code;
`--subcenters K` > 1: sub-center ArcFace's K rows a class, the K constexpr, C K rows of W, files
<kernel>[_saved]_k<K>_..., the configs a launch with K > 1 may take, `heads.fused.configs_for`;
`--grad-dtype bf16`: the head weight's gradient in bf16 (weight.grad_dtype, the trainer's
head.grad_dtype): the backward writes dW in it and the step reads it, files bwd[_saved]_gbf16_...):
registers and spill bytes (ptxas -v), shared memory (Triton's launch request), blocks per SM
(registers in 256-register warp units, shared memory with 1 KB reserved per block, and warps, against
the arch's limits), the MMA instructions in the PTX, the wgmma wait depths (N of
`wgmma.wait_group.sync.aligned N`; the largest > 0 means a wgmma stays in flight across the wait),
the epilogue's SASS instructions per element, and the model's time.

Epilogue SASS per element: in `cuobjdump -sass`, a loop is a backward branch's span [target, branch].
The MMA loop is the innermost loop holding HGMMA/HMMA instructions; the tile loop is the smallest loop
around it (the whole kernel when there is none). With two MMA loops (_bwd's phases), the first one:
phase 1's, per logit; in the saved mode phase 2's, per dW element (phase 1 has none there). The
epilogue = the tile loop's instructions outside the MMA loop, less MMA instructions peeled out of it
and NOPs (so the pipeline's prologue loads count: they are per-tile work too). Divided by the elements
each thread holds per trip (Work.tile / (32 x warps)): thread-instructions per logit (per dW element,
saved _bwd). A static count: predicated branches inside the body count once.

The step table (per arch, dtype and mode) models the step with each kernel's first config (what
deterministic mode runs) and with the config the model rates fastest, plus `LIBRARY`'s parts (the
cuBLAS dX product): forward + backward against the bf16 floor; then with `STEP`'s parts added (the
head's optimizer step: the gradient norm the trainer reads, the fused SGD pass that also makes Wn).
--time (on a CUDA machine: bench/gpu_check.sh's kernels stage) also launches each variant of the local
arch at the headline shape and adds its measured time per step beside the predicted one, and the
head step's Triton pass (heads/fused_step.py) beside its prediction.
Files: DIR/kernels.md (the tables, also printed) and DIR/kernels.json; the last stdout line is JSON.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.kernel_model import (
    ARCHS,
    HEADLINE,
    LIBRARY,
    STEP,
    WORK,
    Arch,
    Buf,
    Config,
    Shape,
    floor_seconds,
    predict,
    sgd_step,
)
from common.cli import CliParser, UserError, run_cli

DTYPES = ("fp16", "bf16")
GRAD_DTYPES = ("fp32", "bf16")  # Shape.grad
# Shape.save_logits -> the mode's name: the backward recomputes the cosines, or reads the saved ones
MODES = {False: "recompute", True: "saved"}
_MODE_FILE = {False: "", True: "_saved"}
MMA_SASS = ("HGMMA", "HMMA")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_PTX_MMA = re.compile(r"\b(wgmma\.mma_async\.[\w.]+|mma\.sync\.aligned\.[\w.]+)")
_PTX_WAIT = re.compile(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


@dataclass
class Variant:
    """One compiled kernel: what the compiler made of it and the model's time for it."""

    kernel: str
    dtype: str
    config: str
    arch: str
    first: bool  # the kernel's first config: deterministic mode's
    save_logits: bool  # the mode: the forward writes the cosines, the backward reads them
    regs: int
    spill_stores: int
    spill_loads: int
    shared: int
    blocks_per_sm: int
    mma: list[str]
    wgmma_waits: list[int]
    epilogue_per_elem: float | None
    predicted_ms: float
    bound: str
    measured_ms: float | None = None
    subcenters: int = 1  # K: the sub-center rows a class
    grad: str = "fp32"  # the dW dtype the backward writes (Shape.grad)

    @property
    def mma_16bit(self) -> bool:
        return bool(self.mma) and all({"bf16", "f16"} >= _operand_types(m) != set() for m in self.mma)

    @property
    def in_flight(self) -> bool:
        return max(self.wgmma_waits, default=0) > 0


def kernels() -> dict[str, tuple[object, list[Config]]]:
    """name -> (JIT function, configs) of every autotuned kernel in heads.fused."""
    from triton.runtime.autotuner import Autotuner

    import heads.fused as fused

    found = {}
    for obj in vars(fused).values():
        if isinstance(obj, Autotuner):
            fn = obj.fn
            name = fn.__name__.strip("_").removesuffix("_kernel")
            tiles = fused.KERNEL_CONFIGS[name]  # the TileConfigs behind obj.configs, with their flags
            found[name] = (
                fn,
                [Config(tuple(c.kwargs().items()), c.warps, c.stages, c.tma, c.one_row) for c in tiles],
            )
    missing = sorted(set(found) - set(WORK))
    if missing:
        raise UserError(
            f"heads/fused.py has kernels with no description in bench/kernel_model.py WORK: "
            f"{', '.join(missing)}"
        )
    return {name: found[name] for name in WORK if name in found}


def _signature(fn, args: dict, cfg: Config) -> tuple[dict, dict, dict]:
    """Triton's signature, constexprs and attributes for these argument values, specialized as its
    launcher would at run time: pointers and integers divisible by 16 carry tt.divisibility=16."""
    values = dict(args, **cfg.kwargs)
    sig, const, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        v = values[name]
        if param.is_constexpr:
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, Buf):
            sig[name] = f"*{v.dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    return sig, const, attrs


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_variant(fn, args: dict, cfg: Config, arch: Arch):
    """(compiled kernel, ptxas -v log): a fresh compile, so ptxas always runs and reports."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, const, attrs = _signature(fn, args, cfg)
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log):
        triton.knobs.cache.dir = cache
        triton.knobs.nvidia.dump_ptxas_log = True
        try:
            compiled = triton.compile(
                ASTSource(fn, sig, const, attrs),
                target=GPUTarget("cuda", arch.cc, 32),
                options={"num_warps": cfg.warps, "num_stages": cfg.stages, "enable_fp_fusion": True},
            )  # the launcher's default
        finally:
            triton.knobs.nvidia.dump_ptxas_log = False
            triton.knobs.cache.dir = None
    return compiled, log.getvalue()


def sass(cubin: bytes) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of each SASS instruction of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    return [(int(a, 16), op, rest) for a, op, rest in _SASS_LINE.findall(text)]


def _loops(instrs) -> list[tuple[int, int]]:
    """[header, back-edge] address spans of the loops: one per header, its last backward branch."""
    spans: dict[int, int] = {}
    for addr, op, rest in instrs:
        target = re.search(r"0x[0-9a-f]+", rest) if op.split(".")[0] == "BRA" else None
        if target and int(target.group(0), 16) < addr:
            head = int(target.group(0), 16)
            spans[head] = max(spans.get(head, addr), addr)
    return sorted(spans.items())


def epilogue_count(instrs) -> int | None:
    """SASS instructions of the loop around the MMA loop, outside the MMA part (module docstring)."""
    mma_addrs = [a for a, op, _ in instrs if op.split(".")[0] in MMA_SASS]
    if not mma_addrs:
        return None
    loops = _loops(instrs)

    def holds_mma(span):
        return any(span[0] <= a <= span[1] for a in mma_addrs)

    # the innermost loop holding MMAs (the smallest span: the pipeliner may let the loop around it
    # branch back into its middle, so spans need not nest) and the smallest loop around it
    mma_loops = [s for s in loops if holds_mma(s)]
    if not mma_loops:
        return None
    inner = min(mma_loops, key=lambda s: s[1] - s[0])
    around = [s for s in loops if s[0] <= inner[0] and inner[1] <= s[1] and s != inner]
    lo, hi = min(around, key=lambda s: s[1] - s[0]) if around else (instrs[0][0], instrs[-1][0])

    def in_mma(addr, op):
        return op.split(".")[0] in MMA_SASS or inner[0] <= addr <= inner[1]

    return sum(1 for a, op, _ in instrs if lo <= a <= hi and op != "NOP" and not in_mma(a, op))


def _operand_types(mma: str) -> set[str]:
    """The operand (A, B) types of a PTX MMA instruction name, e.g. {'bf16'}."""
    known = {"f32", "f16", "bf16", "tf32", "f64", "s8", "u8", "e4m3", "e5m2"}
    types = [p for p in mma.split(".") if p in known]
    # wgmma: .dtype.atype.btype; mma.sync: .dtype.atype.btype.ctype
    return set(types[1:3])


def blocks_per_sm(arch: Arch, regs: int, shared: int, warps: int) -> int:
    """Resident blocks per SM by registers (allocated per warp in units of 256), shared memory (1 KB
    reserved per block) and warps; 0 when a block does not fit at all."""
    if shared > arch.smem_per_block:
        return 0
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = arch.regs_per_sm // per_warp // warps
    by_smem = arch.smem_per_sm // (shared + 1024)
    return min(by_regs, by_smem, arch.max_warps_per_sm // warps, arch.max_blocks_per_sm)


def inspect(
    name: str, fn, cfg: Config, first: bool, dtype: str, arch: Arch, shape: Shape, out: Path | None = None
) -> Variant:
    """Compile one variant, write its PTX and cubin into `out`, and read its figures."""
    work = WORK[name](shape, cfg, dtype, arch, arch.sms)
    compiled, log = compile_variant(fn, work.args, cfg, arch)
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    if out is not None:
        k = f"_k{shape.subcenters}" if shape.subcenters > 1 else ""
        k += f"_g{shape.grad}" if shape.grad != "fp32" and "DW" in work.args else ""
        stem = out / f"{name}{_MODE_FILE[shape.save_logits]}{k}_{dtype}_{cfg.tag}_{arch.name}"
        stem.with_suffix(".ptx").write_text(ptx)
        stem.with_suffix(".cubin").write_bytes(cubin)
    spills, regs = _SPILL.search(log), _REGS.search(log)
    if spills is None or regs is None:
        raise RuntimeError(f"{name} {cfg.tag} {arch.name}: no ptxas -v report in its output: {log[-300:]!r}")
    regs = int(regs.group(1))
    shared = compiled.metadata.shared
    bps = blocks_per_sm(arch, regs, shared, cfg.warps)
    waits = sorted({int(n) for n in _PTX_WAIT.findall(ptx)})
    count = epilogue_count(sass(cubin))
    per_elem = None if count is None else count / (work.tile / (32 * cfg.warps))
    # the descriptions' working sets depend on how many programs are resident at once
    work = WORK[name](shape, cfg, dtype, arch, arch.sms * max(1, bps))
    p = predict(work, arch, per_elem or 0.0, bps, max(waits, default=0) > 0)
    return Variant(
        name,
        dtype,
        cfg.tag,
        arch.name,
        first,
        shape.save_logits,
        regs,
        int(spills.group(1)),
        int(spills.group(2)),
        shared,
        bps,
        sorted(set(_PTX_MMA.findall(ptx))),
        waits,
        None if per_elem is None else round(per_elem, 2),
        round(p.seconds * 1e3, 4),
        p.bound,
        subcenters=shape.subcenters,
        grad=shape.grad if "DW" in work.args else "fp32",
    )


def variant_table(rows: list[Variant]) -> str:
    head = (
        "| kernel | cosines | dtype | config | arch | regs | spill st/ld B | shared KB | blocks/SM | "
        "MMA | wgmma waits | epilogue SASS/elem | predicted ms/step | bound | measured ms/step |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for v in rows:
        mma = ", ".join(m.replace(".sync.aligned", "") for m in v.mma) or "none (FMA)"
        lines.append(
            f"| {v.kernel}{' *' if v.first else ''} | {_mode(v.save_logits, v.subcenters, v.grad)} | "
            f"{v.dtype} | {v.config} | "
            f"{v.arch} | {v.regs} | "
            f"{v.spill_stores}/{v.spill_loads} | {v.shared / 1024:.0f} | {v.blocks_per_sm} | {mma} | "
            f"{','.join(map(str, v.wgmma_waits)) or '-'} | {v.epilogue_per_elem} | {v.predicted_ms} | "
            f"{v.bound} | {'-' if v.measured_ms is None else v.measured_ms} |"
        )
    return "\n".join(lines) + "\n"


def _mode(save_logits: bool, subcenters: int, grad: str = "fp32") -> str:
    return (
        MODES[save_logits]
        + (f", K={subcenters}" if subcenters > 1 else "")
        + (f", dW {grad}" if grad != "fp32" else "")
    )


def step_table(
    rows: list[Variant], arch: Arch, dtype: str, shape: Shape, step_pass_ms: float | None = None
) -> tuple[str, dict]:
    """The modelled step on one arch, dtype and mode (shape.save_logits): first configs and the model's
    fastest per kernel; `step_pass_ms`, the head step's Triton pass as measured (--time)."""
    mine = [
        v for v in rows if v.arch == arch.name and v.dtype == dtype and v.save_logits == shape.save_logits
    ]
    names = list(dict.fromkeys(v.kernel for v in mine))
    first = {n: next(v for v in mine if v.kernel == n and v.first) for n in names}
    best = {
        n: min(
            (v for v in mine if v.kernel == n and v.blocks_per_sm),
            key=lambda v: v.predicted_ms,
            default=first[n],
        )
        for n in names
    }
    lib = {n: predict(f(shape, dtype, arch), arch) for n, f in LIBRARY.items()}
    step = {n: predict(f(shape, dtype, arch), arch) for n, f in STEP.items()}
    floor_ms = floor_seconds(shape, arch) * 1e3
    lines = [
        f"step model, {arch.name} ({arch.gpu}), {dtype}, "
        f"cosines {_mode(shape.save_logits, shape.subcenters, shape.grad)}, "
        f"B={shape.B} D={shape.D} C={shape.C:,}:",
        "",
        "| part | first config | ms | fastest config | ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n in names:
        lines.append(
            f"| {n} | {first[n].config} | {first[n].predicted_ms:.3f} ({first[n].bound}) | "
            f"{best[n].config} | {best[n].predicted_ms:.3f} ({best[n].bound}) |"
        )

    def add(parts: dict, total_first: float, total_best: float, label: str) -> tuple[float, float]:
        for n, p in parts.items():
            ms = p.seconds * 1e3
            lines.append(f"| {n} | - | {ms:.3f} ({p.bound}) | - | {ms:.3f} |")
        ms = sum(p.seconds for p in parts.values()) * 1e3
        total_first, total_best = total_first + ms, total_best + ms
        lines.append(
            f"| **{label}** | | {total_first:.3f} ({total_first / floor_ms:.2f}x floor) | | "
            f"{total_best:.3f} ({total_best / floor_ms:.2f}x floor) |"
        )
        return total_first, total_best

    kernels_first = sum(v.predicted_ms for v in first.values())
    kernels_best = sum(v.predicted_ms for v in best.values())
    tot_first, tot_best = add(lib, kernels_first, kernels_best, "forward + backward")
    with_first, with_best = add(step, tot_first, tot_best, "forward + backward + optimizer step")
    lines.append(f"| bf16 floor (6BCD at {arch.mma_flops / 1e12:.0f} TFLOP/s) | | {floor_ms:.3f} | | |")
    summary = {
        "arch": arch.name,
        "dtype": dtype,
        "save_logits": shape.save_logits,
        "subcenters": shape.subcenters,
        "grad": shape.grad,
        "first_ms": round(tot_first, 3),
        "fastest_ms": round(tot_best, 3),
        "floor_ms": round(floor_ms, 3),
        "library_ms": round(tot_first - kernels_first, 3),
        "step_ms": round(with_first - tot_first, 3),
        "with_step_first_ms": round(with_first, 3),
        "with_step_fastest_ms": round(with_best, 3),
    }
    if step_pass_ms is not None:
        predicted = predict(sgd_step(shape, dtype, arch), arch).seconds * 1e3
        summary["measured_step_pass_ms"] = step_pass_ms
        lines.append(
            f"| the step's Triton pass: measured | | {step_pass_ms:.3f} (predicted {predicted:.3f}) | | |"
        )
    if all(v.measured_ms is not None for v in first.values()):
        measured = sum(v.measured_ms for v in first.values())
        summary["measured_first_ms"] = round(measured, 3)
        lines.append(
            f"| Triton kernels, first configs: measured | | {measured:.3f} (predicted "
            f"{sum(v.predicted_ms for v in first.values()):.3f}) | | |"
        )
    return "\n".join(lines) + "\n", summary


def time_variants(
    rows: list[Variant],
    found: dict,
    shape: Shape,
    device: str = "cuda",
    arch: Arch | None = None,
    repeats: int = 5,
) -> None:
    """Launch each variant of `arch` (default: the local GPU's) at the shape; its median time x launches
    per step into measured_ms. On the CPU (under TRITON_INTERPRET=1: tests) wall-clock time."""
    import torch

    from heads.fused import enable_descriptors

    if arch is None:
        arch = ARCHS.get("sm_{}{}".format(*torch.cuda.get_device_capability()))
    enable_descriptors()
    for name, (fn, configs) in found.items():
        buffers: dict = {}  # one kernel's tensors, shared by its variants
        for v in rows:
            if arch is None or v.arch != arch.name or v.kernel != name:
                continue
            cfg = next(c for c in configs if c.tag == v.config)
            mode = replace(shape, save_logits=v.save_logits, subcenters=v.subcenters, grad=v.grad)
            work = WORK[name](mode, cfg, v.dtype, arch, arch.sms)
            values = {
                n: _tensor(buffers, n, a, device) if isinstance(a, Buf) else a for n, a in work.args.items()
            }
            launch = functools.partial(
                fn[work.grid], **values, **cfg.kwargs, num_warps=cfg.warps, num_stages=cfg.stages
            )
            launch()  # compiles
            samples = sorted(_elapsed_ms(launch, device) for _ in range(repeats))
            v.measured_ms = round(samples[len(samples) // 2] * work.launches, 4)
        del buffers
        if device == "cuda":
            torch.cuda.empty_cache()


def time_step_pass(shape: Shape, arch: Arch, dtype: str, device: str = "cuda", repeats: int = 5) -> float:
    """The head step's Triton pass (heads/fused_step.py) launched with its description's arguments
    (bench/kernel_model.py `sgd_step`) at the shape: its median ms (wall-clock on the CPU)."""
    import torch

    from heads.fused_step import STEP_WARPS, _sgd_step_kernel

    work = sgd_step(shape, dtype, arch)
    buffers: dict = {}
    values = {n: _tensor(buffers, n, a, device) if isinstance(a, Buf) else a for n, a in work.args.items()}
    launch = functools.partial(_sgd_step_kernel[work.grid], **values, num_warps=STEP_WARPS)
    launch()  # compiles
    samples = sorted(_elapsed_ms(launch, device) for _ in range(repeats))
    del buffers, values
    if device == "cuda":
        torch.cuda.empty_cache()
    return round(samples[len(samples) // 2], 4)


def _elapsed_ms(launch, device: str) -> float:
    import torch

    if device != "cuda":
        start = time.perf_counter()
        launch()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    launch()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _tensor(cache: dict, name: str, buf: Buf, device: str):
    """A tensor for a Buf: small values (|x| ~ 0.03), integers (labels) in [0, 64)."""
    import torch

    key = (name, buf)
    if key not in cache:
        dtype = {
            "fp32": torch.float32,
            "bf16": torch.bfloat16,
            "fp16": torch.float16,
            "i64": torch.int64,
            "i32": torch.int32,
            "i8": torch.int8,
        }[buf.dtype]
        if dtype in (torch.int64, torch.int32, torch.int8):
            t = torch.randint(0, 64, buf.shape, device=device, dtype=dtype)
        else:
            t = torch.randn(buf.shape, device=device).mul_(0.03).to(dtype)
        cache[key] = t
    return cache[key]


def compile_and_model(
    out: Path | None,
    archs: list[Arch],
    dtypes: list[str],
    all_configs: bool,
    shape: Shape = HEADLINE,
    timing: bool = False,
) -> tuple[list[Variant], str, list[dict]]:
    from heads.fused import configs_for

    found = kernels()
    modes = [replace(shape, save_logits=saved) for saved in MODES]
    rows = []
    for arch in archs:
        for dtype in dtypes:
            for mode in modes:
                for name, (fn, configs) in found.items():
                    configs = configs_for(configs, shape.subcenters, arch.cc >= 90)  # what a launch may take
                    for i, cfg in enumerate(configs if all_configs else configs[:1]):
                        rows.append(inspect(name, fn, cfg, i == 0, dtype, arch, mode, out))
                        print(
                            f"  {name} {MODES[mode.save_logits]} {dtype} {cfg.tag} {arch.name}: "
                            f"{rows[-1].regs} regs, {rows[-1].spill_stores} B spilled",
                            file=sys.stderr,
                            flush=True,
                        )
    step_measured: dict[tuple[str, str], float] = {}
    if timing:
        time_variants(rows, found, shape)
        import torch

        local = "sm_{}{}".format(*torch.cuda.get_device_capability())
        for dtype in dtypes if local in ARCHS else ():
            step_measured[(local, dtype)] = time_step_pass(shape, ARCHS[local], dtype)
    text = variant_table(rows)
    summaries = []
    for arch in archs:
        for dtype in dtypes:
            for mode in modes:
                table, summary = step_table(rows, arch, dtype, mode, step_measured.get((arch.name, dtype)))
                text += "\n" + table
                summaries.append(summary)
    return rows, text, summaries


def run(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the .ptx/.cubin files, kernels.md, kernels.json")
    p.add_argument("--arch", default="sm_90,sm_80", help=f"comma-separated, of {', '.join(ARCHS)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="operand dtypes, of fp16, bf16")
    p.add_argument(
        "--configs",
        choices=("all", "first"),
        default="all",
        help="every config the tuner may pick, or each kernel's first (deterministic mode's)",
    )
    p.add_argument(
        "--subcenters", type=int, default=1, help="K: sub-center rows per class (sub-center ArcFace), >= 1"
    )
    p.add_argument(
        "--grad-dtype",
        choices=GRAD_DTYPES,
        default="fp32",
        help="the head weight's gradient (weight.grad_dtype): the dW the backward writes, the step reads",
    )
    p.add_argument("--time", action="store_true", help="also launch and time each variant on this CUDA GPU")
    a = p.parse_args(argv)
    if a.subcenters < 1:
        raise UserError(f"--subcenters must be at least 1, got {a.subcenters}")
    archs, dtypes = a.arch.split(","), a.dtypes.split(",")
    bad = [x for x in archs if x not in ARCHS] + [x for x in dtypes if x not in DTYPES]
    if bad:
        raise UserError(f"--arch/--dtypes: unknown {', '.join(bad)} (known: {', '.join((*ARCHS, *DTYPES))})")
    if a.time:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--time needs a CUDA GPU (torch.cuda.is_available() is False)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    shape = replace(HEADLINE, subcenters=a.subcenters, grad=a.grad_dtype)
    rows, text, summaries = compile_and_model(
        out, [ARCHS[x] for x in archs], dtypes, a.configs == "all", shape, timing=a.time
    )
    (out / "kernels.md").write_text(text)
    (out / "kernels.json").write_text(
        json.dumps({"variants": [asdict(v) for v in rows], "steps": summaries}, indent=1) + "\n"
    )
    print(text)
    took = round(time.monotonic() - start, 1)
    print(json.dumps({"bench": "kernels", "variants": len(rows), "seconds": took, "steps": summaries}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
