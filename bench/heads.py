"""Benchmark the margin heads: reference / chunked / fused, forward and backward, against the
matrix-multiply floor measured in the same run.

    python -m bench.heads                                   # CUDA: B=512 D=512 C=8631,100000,1000000
    python -m bench.heads --device cpu --classes 50000      # CPU: chunked vs reference
    python -m bench.heads --impls fused --classes 1000000 --save-logits --grad-dtype bf16

CUDA: one process; each (classes, margin, impl) runs warm-up steps (compilation, autotuning), then
`--repeats` steps timed by CUDA events: forward, backward and their sum, the median of each, and the
head's optimizer step as the trainer makes it (`step_ms`: the gradient norm its clip and guard read,
then heads.head_sgd.FusedHeadSGD: with the fused engine one Triton pass that also makes the next
forward's Wn, so the fused forward has no normalize pass; else torch's SGD). Peak =
torch.cuda.max_memory_allocated during one step beyond what was allocated before it; working = peak
minus dW and dX (the gradients any implementation returns, at their element sizes). The floor: the
three bf16 matrix products of a B x C x D head (X W^T forward, 2BCD flops; G W and G^T X backward,
4BCD), timed the same way at the same shapes, and the fp32 (no TF32) floor beside it; every
implementation's time is given as a multiple of the bf16 floor.
Options (every row records both): `--save-logits`, the fused head's MarginHead option save_logits=True
(its forward keeps the B x C cosines, 2 bytes each, so the backward skips recomputing them; needs
fused in --impls, the other rows record False); `--grad-dtype bf16`, torch's
`head.weight.grad_dtype = torch.bfloat16` on every head made (each engine then writes dW in bf16,
heads.core.gradient_dtype; needs a torch whose Parameter has grad_dtype); the step reads it in
FusedHeadSGD's Triton pass where that takes a bf16 gradient, else in torch's SGD.
CPU: each (classes, margin, impl) in a fresh child process (its working memory is the peak resident
set minus the resident set before the first step), wall-clock timing, no floor.
Sub-centers: one more row, the head with `--subcenters K` rows a class (default 3; 1: none) at the
largest C and the first margin, in the non-reference implementation (fused on CUDA, chunked on the
CPU), its time and working memory against the same head with one row a class.
The last stdout line is JSON: every row, the floors, the headline at the largest C (first margin):
the fastest non-reference implementation against the reference, and the sub-center row's ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common.cli import CliParser, UserError, run_cli

REPO = Path(__file__).resolve().parent.parent
IMPLS = ("reference", "chunked", "fused")


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples), 3)


def _cuda_step_times(head, x, y, warmup: int, repeats: int) -> dict:
    import torch

    from heads.head_sgd import FusedHeadSGD

    # the trainer's head step after the backward: the gradient norm its clip and guard read, then its
    # SGD (the fused engine's head: one Triton pass that also makes the next forward's Wn, so the
    # fused forward measured here makes none; the others: torch's foreach SGD). A small lr keeps the
    # weights where they started.
    opt = FusedHeadSGD([head.weight], head=head, lr=1e-3, momentum=0.9, weight_decay=5e-4)
    fwd, bwd, step = [], [], []
    for i in range(warmup + repeats):
        head.weight.grad, x.grad = None, None
        e0, e1, e2, e3 = (torch.cuda.Event(enable_timing=True) for _ in range(4))
        e0.record()
        loss = head(x, y)
        e1.record()
        loss.backward()
        e2.record()
        torch.nn.utils.clip_grad_norm_([head.weight], float("inf"))
        opt.step()
        e3.record()
        torch.cuda.synchronize()
        if i >= warmup:
            fwd.append(e0.elapsed_time(e1))
            bwd.append(e1.elapsed_time(e2))
            step.append(e2.elapsed_time(e3))
    return {
        "fwd_ms": _median_ms(fwd),
        "bwd_ms": _median_ms(bwd),
        "total_ms": _median_ms([a + b for a, b in zip(fwd, bwd)]),
        "step_ms": _median_ms(step),
        "with_step_ms": _median_ms([a + b + c for a, b, c in zip(fwd, bwd, step)]),
    }


def _cuda_memory(head, x, y) -> dict:
    import torch

    head.weight.grad, x.grad = None, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    head(x, y).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    grads = _grad_bytes(head, x)
    return {"peak_mib": round(peak / 2**20, 1), "working_mib": round(max(0, peak - grads) / 2**20, 1)}


def _grad_bytes(head, x) -> int:
    """Bytes of dW and dX as the backward left them (dW in bf16 with --grad-dtype bf16)."""
    return sum(t.grad.numel() * t.grad.element_size() for t in (head.weight, x))


def _make(args: argparse.Namespace, impl: str, classes: int, margin: str, device: str, subcenters: int = 1):
    import torch

    from heads import MarginHead

    torch.manual_seed(0)
    t = 1.0 if margin == "curricularface" else args.t  # CurricularFace has its own hard-negative rule
    head = MarginHead(
        classes,
        args.dim,
        margin=margin,
        t=t,
        impl=impl,
        block=args.block,
        operands=args.operands,
        save_logits=_saves_logits(args, impl),
        subcenters=subcenters,
    ).to(device)
    if args.grad_dtype == "bf16":  # autograd keeps weight.grad in bf16; the engines write dW in it
        head.weight.grad_dtype = torch.bfloat16
    x = torch.randn(args.batch, args.dim, device=device, requires_grad=True)
    y = torch.randint(0, classes, (args.batch,), device=device)
    return head, x, y


def _saves_logits(args: argparse.Namespace, impl: str) -> bool:
    """Whether this implementation's head keeps its cosines (--save-logits is the fused head's option)."""
    return args.save_logits and impl == "fused"


def _row_key(args: argparse.Namespace, impl: str, classes: int, margin: str, subcenters: int) -> dict:
    """What a row ran: implementation, shape, margin and the two options."""
    return {
        "impl": impl,
        "classes": classes,
        "margin": margin,
        "subcenters": subcenters,
        "save_logits": _saves_logits(args, impl),
        "grad_dtype": args.grad_dtype,
    }


def _cuda_row(args: argparse.Namespace, impl: str, classes: int, margin: str, subcenters: int = 1) -> dict:
    import torch

    row = _row_key(args, impl, classes, margin, subcenters)
    try:
        head, x, y = _make(args, impl, classes, margin, "cuda", subcenters)
        row.update(_cuda_step_times(head, x, y, args.warmup, args.repeats))
        row.update(_cuda_memory(head, x, y))
        if impl == "fused":
            row["kernels"] = head.engine("fused").kernels
    except torch.cuda.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err).splitlines()[0][:120]}"
    finally:
        head = x = y = None
        torch.cuda.empty_cache()
    return row


def _time_products(products, repeats: int) -> float:
    """Median ms of running every product once, CUDA events, after one warm-up."""
    import torch

    samples = []
    for i in range(repeats + 1):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for f in products:
            f()
        e1.record()
        torch.cuda.synchronize()
        if i:
            samples.append(e0.elapsed_time(e1))
    return _median_ms(samples)


def _products_ms(batch: int, classes: int, dim: int, dtype, repeats: int) -> tuple[float, float]:
    """(forward, backward) ms of the head's matrix products in `dtype`: X W^T; G W and G^T X."""
    import torch

    x = torch.randn(batch, dim, device="cuda", dtype=dtype)
    w = torch.randn(classes, dim, device="cuda", dtype=dtype)
    g = torch.randn(batch, classes, device="cuda", dtype=dtype)
    return (
        _time_products([lambda: x @ w.t()], repeats),
        _time_products([lambda: g @ w, lambda: g.t() @ x], repeats),
    )


def cuda_floor(batch: int, classes: int, dim: int, repeats: int) -> dict:
    """The head's three matrix products at its shapes, bf16 and fp32 (TF32 off), in ms."""
    import torch

    out = {"classes": classes}
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        fwd, bwd = _products_ms(batch, classes, dim, dtype, repeats)
        torch.cuda.empty_cache()
        flops = 6 * batch * classes * dim
        out.update(
            {
                f"{name}_fwd_ms": fwd,
                f"{name}_bwd_ms": bwd,
                f"{name}_total_ms": round(fwd + bwd, 3),
                f"{name}_tflops": round(flops / ((fwd + bwd) * 1e-3) / 1e12, 1),
            }
        )
    return out


def _cpu_child(args: argparse.Namespace) -> dict:
    head, x, y = _make(args, args.impls[0], args.classes[0], args.margins[0], "cpu", args.subcenters)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fwd, bwd = [], []
    for i in range(args.warmup + args.repeats):
        head.weight.grad, x.grad = None, None
        t0 = time.perf_counter()
        loss = head(x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if i >= args.warmup:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
    # glibc mmaps tensors this large and returns them on free, so RSS follows live tensor bytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    grads = _grad_bytes(head, x)
    return {
        **_row_key(args, args.impls[0], args.classes[0], args.margins[0], args.subcenters),
        "fwd_ms": _median_ms(fwd),
        "bwd_ms": _median_ms(bwd),
        "total_ms": _median_ms([a + b for a, b in zip(fwd, bwd)]),
        "peak_mib": round(max(0, peak) / 2**20, 1),
        "working_mib": round(max(0, peak - grads) / 2**20, 1),
    }


def _cpu_row(args: argparse.Namespace, impl: str, classes: int, margin: str, subcenters: int = 1) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.heads",
        "--child",
        "--device",
        "cpu",
        "--impls",
        impl,
        "--classes",
        str(classes),
        "--margins",
        margin,
        "--subcenters",
        str(subcenters),
        "--grad-dtype",
        args.grad_dtype,
    ]
    for key in ("batch", "dim", "t", "repeats", "warmup", "operands") + (("block",) if args.block else ()):
        cmd += [f"--{key}", str(getattr(args, key))]
    if args.save_logits:
        cmd.append("--save-logits")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise UserError(f"the {impl} run at C={classes} failed (see above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(args: argparse.Namespace, rows: list[dict], floors: dict[int, dict]) -> dict:
    for r in rows:
        floor = floors.get(r["classes"])
        if floor and "total_ms" in r:
            r["x_bf16_floor"] = round(r["total_ms"] / floor["bf16_total_ms"], 2)
        if floor and "with_step_ms" in r:
            r["with_step_x_bf16_floor"] = round(r["with_step_ms"] / floor["bf16_total_ms"], 2)
    ok = [r for r in rows if "total_ms" in r and r["subcenters"] == 1]
    top = max(args.classes)
    at_top = [r for r in ok if r["classes"] == top and r["margin"] == args.margins[0]]
    ref = next((r for r in at_top if r["impl"] == "reference"), None)
    best = min((r for r in at_top if r["impl"] != "reference"), key=lambda r: r["total_ms"], default=None)
    out = {
        "bench": "heads",
        "device": args.device,
        "batch": args.batch,
        "dim": args.dim,
        "t": args.t,
        "operands": args.operands,
        "save_logits": args.save_logits,
        "grad_dtype": args.grad_dtype,
        "classes": top,
        "margin": args.margins[0],
        "baseline": "reference",
        "rows": rows,
        "floors": list(floors.values()),
    }
    if best is not None:
        out.update(
            impl=best["impl"], seconds=best["total_ms"] / 1e3, working_bytes=best["working_mib"] * 2**20
        )
    if ref is not None:
        out.update(baseline_seconds=ref["total_ms"] / 1e3, baseline_working_bytes=ref["working_mib"] * 2**20)
    if best is not None and ref is not None:
        out["speedup"] = round(ref["total_ms"] / best["total_ms"], 2)
        out["memory_ratio"] = round(ref["working_mib"] / max(best["working_mib"], 0.1), 2)
    if best is not None and top in floors:
        out["x_bf16_floor"] = best.get("x_bf16_floor")
    sub = next((r for r in rows if r["subcenters"] > 1 and "total_ms" in r), None)
    one = next((r for r in at_top if sub is not None and r["impl"] == sub["impl"]), None)
    if sub is not None and one is not None:
        out["subcenters"] = {
            "K": sub["subcenters"],
            "impl": sub["impl"],
            "total_ms": sub["total_ms"],
            "working_mib": sub["working_mib"],
            "x_time_vs_k1": round(sub["total_ms"] / one["total_ms"], 2),
            "x_working_memory_vs_k1": round(sub["working_mib"] / max(one["working_mib"], 0.1), 2),
        }
    return out


def _print_table(args: argparse.Namespace, rows: list[dict], floors: dict[int, dict]) -> None:
    nan = float("nan")
    print(f"dW in {args.grad_dtype}; fused save_logits {'on' if args.save_logits else 'off'}")
    print(
        f"{'impl':>9} {'C':>8} {'margin':>14} {'K':>2} {'fwd ms':>9} {'bwd ms':>9} {'total ms':>9} "
        f"{'x bf16 floor':>12} {'step ms':>8} {'x with step':>11} {'peak MiB':>9} {'work MiB':>9}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:>9} {r['classes']:>8} {r['margin']:>14} {r['subcenters']:>2}  {r['error']}")
            continue
        print(
            f"{r['impl']:>9} {r['classes']:>8} {r['margin']:>14} {r['subcenters']:>2} {r['fwd_ms']:9.2f} "
            f"{r['bwd_ms']:9.2f} {r['total_ms']:9.2f} {r.get('x_bf16_floor', nan):12.2f} "
            f"{r.get('step_ms', nan):8.2f} {r.get('with_step_x_bf16_floor', nan):11.2f} "
            f"{r['peak_mib']:9.1f} {r['working_mib']:9.1f}"
        )
    for f in floors.values():
        print(
            f"floor C={f['classes']}: bf16 {f['bf16_fwd_ms']:.2f} + {f['bf16_bwd_ms']:.2f} = "
            f"{f['bf16_total_ms']:.2f} ms ({f['bf16_tflops']} TFLOP/s); fp32 {f['fp32_total_ms']:.2f} ms"
        )


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v]
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return parse


def _parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m bench.heads", description=__doc__.splitlines()[0])
    p.add_argument(
        "--impls",
        type=_csv(str),
        default=None,
        help="comma list (default: reference,chunked,fused on CUDA; reference,chunked on CPU)",
    )
    p.add_argument("--batch", type=int, default=None, help="default 512 on CUDA, 256 on CPU")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument(
        "--classes",
        type=_csv(int),
        default=None,
        help="comma list (default 8631,100000,1000000 on CUDA; 50000 on CPU)",
    )
    p.add_argument("--margins", type=_csv(str), default=["arcface", "cosface"])
    p.add_argument("--t", type=float, default=1.1, help="SV-Softmax t (1 = off)")
    p.add_argument("--block", type=int, default=None, help="chunked: classes per block")
    p.add_argument(
        "--operands",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="chunked/fused product operands (auto: fp16 on CUDA, fp32 on the CPU)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 10 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3 CUDA, 1 CPU)")
    p.add_argument(
        "--subcenters",
        type=int,
        default=3,
        help="K of the sub-center row (fused on CUDA, chunked on the CPU, largest C, first margin); 1: none",
    )
    p.add_argument(
        "--save-logits",
        action="store_true",
        help="fused: the forward keeps the B x C cosines and the backward skips recomputing them",
    )
    p.add_argument(
        "--grad-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="the head weight's gradient (torch's weight.grad_dtype), every implementation (default fp32)",
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def _check(args: argparse.Namespace) -> None:
    """Mistakes in the arguments, before torch is imported (one line each)."""
    for key in ("batch", "dim", "repeats", "subcenters"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UserError(f"--{key} must be at least 1")
    if (args.warmup is not None and args.warmup < 0) or (
        args.classes is not None and (not args.classes or min(args.classes) < 1)
    ):
        raise UserError("--warmup must be >= 0 and --classes a comma list of positive integers")
    for impl in args.impls or ():
        if impl not in IMPLS:
            raise UserError(f"--impls: unknown implementation {impl!r} (expected {', '.join(IMPLS)})")
    from heads.margins import MARGINS

    for margin in args.margins:
        if margin not in MARGINS or margin == "none":
            raise UserError(f"--margins: unknown margin {margin!r}")
    if args.device == "cpu" and "fused" in (args.impls or ()):
        raise UserError("--impls fused needs --device cuda (the interpreter is for tests, not timing)")
    if args.save_logits and args.impls is not None and "fused" not in args.impls:
        raise UserError("--save-logits is the fused head's option: --impls must include fused")


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    _check(args)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    from heads.core import GRAD_DTYPE_SUPPORTED

    if args.grad_dtype == "bf16" and not GRAD_DTYPE_SUPPORTED:
        raise UserError(f"--grad-dtype bf16: torch {torch.__version__} has no Parameter.grad_dtype")
    gpu = args.device == "cuda"
    defaults = {
        "impls": list(IMPLS) if gpu else ["reference", "chunked"],
        "batch": 512 if gpu else 256,
        "classes": [8631, 100_000, 1_000_000] if gpu else [50_000],
        "repeats": 10 if gpu else 3,
        "warmup": 3 if gpu else 1,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    _check(args)
    return args


def _progress(row: dict) -> None:
    print(
        f"  {row['impl']} C={row['classes']} {row['margin']} K={row['subcenters']}: "
        f"{row.get('total_ms', row.get('error'))}",
        file=sys.stderr,
        flush=True,
    )


def run(argv: list[str] | None = None) -> int:
    args = _resolve(_parser().parse_args(argv))
    if args.child:
        print(json.dumps(_cpu_child(args)))
        return 0
    row = _cuda_row if args.device == "cuda" else _cpu_row
    rows, floors = [], {}
    for classes in args.classes:
        if args.device == "cuda":
            floors[classes] = cuda_floor(args.batch, classes, args.dim, args.repeats)
        for margin in args.margins:
            for impl in args.impls:
                rows.append(row(args, impl, classes, margin))
                _progress(rows[-1])
    fast = [impl for impl in args.impls if impl != "reference"]
    if args.subcenters > 1 and fast:  # the sub-center row, beside its K = 1 row
        rows.append(row(args, fast[-1], max(args.classes), args.margins[0], args.subcenters))
        _progress(rows[-1])
    _print_table(args, rows, floors)
    print(json.dumps(_summary(args, rows, floors)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
