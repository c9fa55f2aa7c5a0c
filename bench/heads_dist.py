"""Benchmark the class-sharded head against the replicated one under torchrun: time and memory per rank.

    python -m bench.heads_dist --world 2 --classes 200000 --dim 512 --batch 128 [--sample-rate 0.1]

Each mode runs in its own `torchrun --standalone` launch (gloo on the CPU, NCCL on GPUs), so the
peaks do not mix. One step = forward, backward and an SGD (momentum 0.9) step of the head alone, on
random embeddings of `--batch` rows per rank (the backbone's cost is the same in both modes):
- replicate: every rank holds the whole C x D head in DDP (gradient_as_bucket_view=True), which
  all-reduces its gradient; today's trainer.
- shard: heads.sharded.ShardedMarginHead, C / world classes per rank, not in DDP.
- shard + Partial FC (when --sample-rate < 1): the same with that share of the negatives.
Time: the median step after one warm-up step (the slowest rank's). Memory: the peak resident set
(CPU, getrusage) or peak allocated bytes (CUDA) during the steps minus the figure before the head
was built, the largest over the ranks; beside it the head's own tensors by the formula
(heads.sharded.head_bytes) and the bytes each rank sends per step (heads.sharded.step_traffic).
The last stdout line is JSON with the shard figures and the replicate baseline of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.cli import CliParser, UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from heads import MarginHead
    from heads.sharded import ShardedMarginHead, head_bytes, sampled_rows, step_traffic

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)

    def build(classes: int):
        if args.mode == "replicate":
            head = MarginHead(classes, args.dim, margin=args.margin).to(device)
            return head, DDP(head, device_ids=[device.index] if cuda else None, gradient_as_bucket_view=True)
        head = ShardedMarginHead(classes, args.dim, margin=args.margin, sample_rate=args.sample_rate)
        return head.to(device), head.to(device)

    # a tiny head first: the libraries' lazy start-up (gloo, autograd, BLAS) stays out of the peak
    tiny, tiny_model = build(8)
    xt = torch.randn(args.batch, args.dim, device=device, requires_grad=True)
    tiny_model(xt, torch.zeros(args.batch, dtype=torch.long, device=device)).backward()
    torch.optim.SGD(tiny.parameters(), lr=0.1, momentum=0.9).step()
    del tiny, tiny_model, xt
    before = _peak_bytes(device)
    head, model = build(args.classes)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(args.batch, args.dim, device=device, requires_grad=True)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    times = []
    for step in range(args.steps + 1):  # the first is warm-up
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        getattr(head, "set_step", lambda s: None)(step)
        opt.zero_grad(set_to_none=True)
        model(x, y).backward()
        with sampled_rows(opt, head.weight, getattr(head, "sampled", None)):
            opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    parallel = "replicate" if args.mode == "replicate" else "shard"
    world = dist.get_world_size()
    out = {
        "seconds": statistics.median(times[1:]),
        "peak_bytes": max(0, _peak_bytes(device) - before),
        "head_bytes": head_bytes(args.classes, args.dim, world, parallel, 1, args.sample_rate)["total"],
        "sent_bytes_per_step": step_traffic(
            args.classes, args.dim, args.batch, world, parallel, backend=dist.get_backend()
        ),
    }
    (Path(args.out) / f"{args.mode}-rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    del model, head, opt
    dist.destroy_process_group()


def _launch(args: argparse.Namespace, mode: str, rate: float, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.world}",
        "-m",
        "bench.heads_dist",
        "--worker",
        "--mode",
        mode,
        "--sample-rate",
        str(rate),
        "--out",
        str(out),
    ]
    for key in ("classes", "dim", "batch", "steps", "margin"):
        cmd += [f"--{key}", str(getattr(args, key))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise UserError(f"the {mode} run failed (see above)")
    ranks = [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(args.world)]
    return {
        "seconds": max(r["seconds"] for r in ranks),
        "peak_bytes": max(r["peak_bytes"] for r in ranks),
        "head_bytes": ranks[0]["head_bytes"],
        "sent_bytes_per_step": ranks[0]["sent_bytes_per_step"],
    }


def _parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m bench.heads_dist", description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="ranks (processes)")
    p.add_argument("--classes", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=128, help="rows per rank")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    p.add_argument("--margin", choices=["cosface", "arcface", "sphereface", "combined"], default="arcface")
    p.add_argument("--sample-rate", type=float, default=1.0, help="also run Partial FC at this rate (< 1)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["replicate", "shard", "pfc"], default="shard", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    for key in ("world", "classes", "dim", "batch", "steps"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be at least 1")
    if not 0.0 < args.sample_rate <= 1.0:
        raise UserError(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    runs = [("replicate", 1.0), ("shard", 1.0)]
    if args.sample_rate < 1:
        runs.append(("pfc", args.sample_rate))
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, rate in runs:
            print(f"running {mode} on {args.world} ranks ...", file=sys.stderr)
            res[mode] = _launch(args, mode, rate, Path(tmp))
    for mode, r in res.items():
        print(
            f"{mode:>9}: {r['seconds'] * 1e3:9.1f} ms/step  peak {r['peak_bytes'] / 2**20:8.1f} MiB/rank  "
            f"head tensors {r['head_bytes'] / 2**20:8.1f} MiB  "
            f"sent {r['sent_bytes_per_step'] / 2**20:8.2f} MiB/step"
        )
    rep, sh = res["replicate"], res["shard"]
    summary = {
        "bench": "heads_dist",
        "world": args.world,
        "classes": args.classes,
        "dim": args.dim,
        "batch_per_rank": args.batch,
        "margin": args.margin,
        "seconds": sh["seconds"],
        "peak_bytes": sh["peak_bytes"],
        "baseline": "replicate",
        "baseline_seconds": rep["seconds"],
        "baseline_peak_bytes": rep["peak_bytes"],
        "time_ratio": rep["seconds"] / sh["seconds"],
        "memory_ratio": rep["peak_bytes"] / max(sh["peak_bytes"], 1),
        "sent_bytes_per_step": sh["sent_bytes_per_step"],
        "baseline_sent_bytes_per_step": rep["sent_bytes_per_step"],
    }
    if "pfc" in res:
        summary.update(
            {
                "pfc_sample_rate": args.sample_rate,
                "pfc_seconds": res["pfc"]["seconds"],
                "pfc_peak_bytes": res["pfc"]["peak_bytes"],
            }
        )
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
