"""Training-step throughput of a backbone with some constructor options against the same backbone
without them (its defaults), in one run on the CPU.

A step: forward, backward of a plain loss on the embeddings, SGD with momentum; the two models take
turns step by step on the same batch, and each one's fastest step after the first counts (the
least disturbed by other work on a shared machine). Also the work per image, forward and backward,
counted with torch's FlopCounterMode. Prints both, the ratio, and one JSON line last.

    python -m bench.backbones --backbone ir_small --option stem_stride=2 [--threads 1 --batch 32]
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from common.cli import CliParser, UserError, positive, run_cli
from models.backbones import available_backbones, build_backbone


def _option(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise UserError(f"--option {text!r}: expected NAME=VALUE (a YAML value), e.g. stem_stride=2")
    return name, yaml.safe_load(value)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()
    return time.perf_counter() - start


def _gflops_per_image(model: torch.nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as flops:
        model(x).square().mean().backward()
    return flops.get_total_flops() / len(x) / 1e9


def run(argv: Sequence[str] | None = None) -> int:
    p = CliParser(prog="python -m bench.backbones", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="ir_small", help="a registered backbone (default ir_small)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a constructor option of the measured model (repeatable)",
    )
    p.add_argument("--image-size", type=positive, default=112)
    p.add_argument("--embedding-size", type=positive, default=128)
    p.add_argument("--batch", type=positive, default=32)
    p.add_argument("--steps", type=positive, default=6, help="steps of each model (default 6)")
    p.add_argument("--threads", type=positive, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    if args.backbone not in available_backbones():
        raise UserError(f"--backbone {args.backbone!r} is not one of {', '.join(available_backbones())}")
    options = dict(_option(text) for text in args.option)
    torch.set_num_threads(args.threads)
    size = (args.image_size, args.image_size)
    torch.manual_seed(0)
    try:
        models = {
            "baseline": build_backbone(args.backbone, args.embedding_size, size),
            "options": build_backbone(args.backbone, args.embedding_size, size, **options),
        }
    except (TypeError, ValueError) as err:
        raise UserError(f"--option {options}: cannot build {args.backbone!r} ({err})") from None
    x = torch.randn(args.batch, 3, *size)
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    gflops = {k: _gflops_per_image(m.train(), x) for k, m in models.items()}
    best = dict.fromkeys(models, float("inf"))
    load = os.getloadavg()[0]
    for step in range(args.steps + 1):
        for k, m in models.items():
            took = _step(m, optimizers[k], x)
            if step > 0:  # the first warms the allocator
                best[k] = min(best[k], took)
    ips = {k: args.batch / best[k] for k in models}
    for k in models:
        print(f"{k:>8}: {ips[k]:8.1f} images/s  {gflops[k]:.3f} GFLOPs per image (forward + backward)")
    print(
        json.dumps(
            {
                "bench": "backbones",
                "backbone": args.backbone,
                "options": options,
                "image_size": args.image_size,
                "batch": args.batch,
                "threads": args.threads,
                "baseline_images_per_s": round(ips["baseline"], 1),
                "options_images_per_s": round(ips["options"], 1),
                "speedup": round(ips["options"] / ips["baseline"], 2),
                "baseline_gflops_per_image": round(gflops["baseline"], 3),
                "options_gflops_per_image": round(gflops["options"], 3),
                "load_average_before": round(load, 1),
            }
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
