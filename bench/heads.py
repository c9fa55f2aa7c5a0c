"""Benchmark one head implementation against the reference: forward+backward time and working memory.

    python bench/heads.py --impl chunked --batch 256 --dim 512 --classes 200000 --margin arcface

Each implementation (the one asked for, then "reference") runs in a fresh child process so that
peaks do not mix. Working memory = peak memory during the timed steps minus the bytes of W, the
embeddings and their two gradients (those any implementation must hold):
- CUDA: torch.cuda.max_memory_allocated() after reset, minus the allocation before the step.
- CPU: the process's peak resident set (getrusage ru_maxrss) minus the resident set just before
  the first step. Tensors this large are mmap'ed by glibc and returned on free, so RSS follows
  live tensor bytes; the CPU figure is therefore defensible to within a few MB of allocator noise.
On a GPU the matrix-multiply floor is also printed: 6*B*C*D flops (2 forward, 4 backward) at the
rate torch.matmul measures on this card in the same run for the head's compute dtype.
The last stdout line is JSON with the figures and the reference's, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from shards.errors import CliParser, UserError, run_cli


def _child(args: argparse.Namespace) -> dict:
    import torch

    from heads import MarginHead

    dev = torch.device(args.device)
    torch.manual_seed(0)
    head = MarginHead(args.classes, args.dim, margin=args.margin, t=args.t, impl=args.impl,
                      block=args.block).to(dev)
    x = torch.randn(args.batch, args.dim, device=dev, requires_grad=True)
    y = torch.randint(0, args.classes, (args.batch,), device=dev)
    fixed = 2 * (head.weight.numel() + x.numel()) * 4  # W, x and their gradients (fp32)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step() -> None:
        head.weight.grad = None
        x.grad = None
        head(x, y).backward()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.repeats + 1):  # the first is warm-up (and kernel compilation)
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - before
        grads = fixed // 2
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        grads = fixed // 2
    out = {"impl": args.impl, "seconds": statistics.median(times[1:]), "working_bytes": max(0, peak - grads)}
    if dev.type == "cuda":
        a = torch.randn(args.batch, args.dim, device=dev)
        b = torch.randn(min(args.classes, 65536), args.dim, device=dev)
        for _ in range(3):
            a @ b.t()
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b.t()
        sync()
        rate = 10 * 2 * a.shape[0] * b.shape[0] * a.shape[1] / (time.perf_counter() - t0)
        out["matmul_flops_per_s"] = rate
        out["floor_seconds"] = 6 * args.batch * args.classes * args.dim / rate
    return out


def _parser() -> argparse.ArgumentParser:
    p = CliParser(prog="bench/heads.py", description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=["reference", "chunked", "fused"], default="chunked")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=200_000)
    p.add_argument("--margin", choices=["cosface", "arcface", "sphereface", "combined"], default="arcface")
    p.add_argument("--t", type=float, default=1.0, help="SV-Softmax t (1 = off)")
    p.add_argument("--block", type=int, default=None, help="chunked: classes per block")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for key in ("batch", "dim", "classes", "repeats"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be at least 1")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    from rich.progress import Progress

    results = {}
    impls = [args.impl] if args.impl == "reference" else [args.impl, "reference"]
    with Progress(transient=True, console=None) as bar:
        task = bar.add_task("benchmarking heads", total=len(impls))
        for impl in impls:
            # -P: this file is named heads.py; keep its folder off sys.path so `heads` is the package
            cmd = [sys.executable, "-P", __file__, "--child", "--impl", impl, "--device", args.device]
            for key in ("batch", "dim", "classes", "margin", "t", "repeats"):
                cmd += [f"--{key}", str(getattr(args, key))]
            if args.block:
                cmd += ["--block", str(args.block)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise UserError(f"the {impl} run failed (see above)")
            results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            bar.advance(task)
    ref = results["reference"]
    for r in results.values():
        floor = f"  floor {r['floor_seconds'] * 1e3:.1f} ms" if "floor_seconds" in r else ""
        print(f"{r['impl']:>9}: {r['seconds'] * 1e3:9.1f} ms fwd+bwd  "
              f"working memory {r['working_bytes'] / 2**20:9.1f} MiB{floor}")
    got = results[args.impl]
    summary = {"bench": "heads", "device": args.device, "batch": args.batch, "dim": args.dim,
               "classes": args.classes, "margin": args.margin, "t": args.t, "impl": args.impl,
               "seconds": got["seconds"], "working_bytes": got["working_bytes"],
               "baseline": "reference", "baseline_seconds": ref["seconds"],
               "baseline_working_bytes": ref["working_bytes"],
               "time_ratio": got["seconds"] / ref["seconds"],
               "memory_ratio": ref["working_bytes"] / max(got["working_bytes"], 1)}
    if "floor_seconds" in got:
        summary["floor_seconds"] = got["floor_seconds"]
        summary["floor_ratio"] = got["seconds"] / got["floor_seconds"]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
