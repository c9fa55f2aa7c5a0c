"""Run by tests/heads/test_sharded.py and tests/trainer/test_head_parallel.py under torchrun
(gloo, CPU). Two modes:

_heads_sharded_worker.py OUT
    the head checks: every rank builds the same global data, runs the single-process MarginHead
    (the float64 reference) on the whole batch and the ShardedMarginHead on its own rows and
    classes, and writes the largest relative differences (and what the sampling checks saw) to
    OUT/rank{r}.json; rank 0 also saves the gathered per-class state after two SGD steps; and the
    trainer's sharded head starts from the replicated head's rows with the same first loss. The head
    checks run again with K = 2 sub-centers (keys "..._k2"), with dominant_subcenters.
_heads_sharded_worker.py train '{"dump_after_resume": FILE, "record_step": S, "kill_rank": R,
                                 "kill_at_call": K, "signal": "SIGKILL", "faults": {...}}' [main args]
    trainer/main.py with tests/_trainer_faults.py's FaultHooks(**faults); dump_after_resume: the
    head's per-class state, gathered right after set-up and resume, to FILE; record_step: each rank
    writes (label, pixel sum) of its batch at that 0-based step to RUN/batch-rank{r}.json;
    kill_rank: that rank sends itself `signal` on its K-th labels gather of the sharded head (the
    other ranks are then inside the head's collectives).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from heads import MarginHead
from heads.core import subcenter_rows
from heads.sharded import ShardedMarginHead, class_range, gather_class_state, row_range, sampled_rows

C, D, B = 11, 6, 4  # C % 2 and C % 3 != 0; B rows per rank
CASES = [  # name, MarginHead kwargs
    ("cosface", {"margin": "cosface"}),
    ("arcface_fallback", {"margin": "arcface"}),
    ("sphereface", {"margin": "sphereface", "m": 4, "lambda_min": 0.0}),
    ("combined", {"margin": "combined", "m1": 0.9, "m2": 0.4, "m3": 0.15}),
    ("sv_t1.1", {"margin": "arcface", "t": 1.1, "s": 8.0}),
    ("focal", {"margin": "cosface", "gamma_focal": 2.0}),
    ("adaface", {"margin": "adaface"}),
    ("magface", {"margin": "magface", "l_a": 1.0, "u_a": 5.0}),  # the data's norms lie inside [l_a, u_a]
    ("curricularface", {"margin": "curricularface"}),
]


def global_data(world: int, classes: int = C, per_rank: int = B, seed: int = 0, subcenters: int = 1):
    """x (N x D), w (C K x D), y (N): a label in every rank's range, the last class, a fallback row
    (its class's first sub-center)."""
    g = torch.Generator().manual_seed(seed)
    n = per_rank * world
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    w = torch.randn(classes * subcenters, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    for r in range(world):
        y[r * per_rank] = class_range(classes, r, world)[0]  # each rank's first row: a class it owns
    y[-1] = classes - 1
    x[1] = -w[y[1] * subcenters]  # theta = pi: arcface's fallback branch (for K = 1)
    return x, w, y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def loss_and_grads(head, x, y):
    xx = x.clone().requires_grad_()
    loss = head(xx, y)
    gx, gw = torch.autograd.grad(loss, [xx, head.weight])
    return loss.detach(), gx, gw


def check_margins(rank: int, world: int, K: int = 1) -> dict[str, list[float]]:
    x, w, y = global_data(world, subcenters=K)
    a, b = row_range(C * K, K, rank, world)
    rows = slice(rank * B, (rank + 1) * B)
    out = {}
    for name, kw in CASES:
        xc = x.clone()
        if name == "magface":  # no fallback branch: at c_y = -1 acos would turn the last bit into 1e-8
            xc[1] += 0.5
        ref = MarginHead(C, D, impl="reference", subcenters=K, **kw).double()
        sh = ShardedMarginHead(C, D, impl="chunked", block=2, subcenters=K, **kw).double()
        with torch.no_grad():
            ref.weight.copy_(w)
            sh.weight.copy_(w[a:b])
        errs = []
        for step in range(2):  # two training steps: the margins' running state moves from the global batch
            xs = xc * (1.0 + 0.3 * step)
            lr, gxr, gwr = loss_and_grads(ref, xs, y)
            ls, gxs, gws = loss_and_grads(sh, xs[rows], y[rows])
            d_state = max(
                [rel(s, r) for (_, s), (_, r) in zip(sh.named_buffers(), ref.named_buffers())], default=0.0
            )
            errs.append([rel(ls, lr), rel(gxs, gxr[rows]), rel(gws, gwr[a:b]), d_state])
        out[name] = [max(e[i] for e in errs) for i in range(4)]
    return out


def check_sampled_vs_reference(rank: int, world: int, K: int = 1) -> dict:
    """rate 0.1 of 1000 classes: the loss equals MarginHead over exactly the sampled classes (with K
    sub-centers: all K rows of each; `sampled` lists those rows)."""
    classes = 1000
    x, w, y = global_data(world, classes, per_rank=6, seed=1, subcenters=K)
    a, b = class_range(classes, rank, world)
    sh = ShardedMarginHead(classes, D, impl="chunked", block=16, sample_rate=0.1, seed=7, subcenters=K)
    sh = sh.double()
    with torch.no_grad():
        sh.weight.copy_(w[a * K : b * K])
    sh.set_step(3)
    rows = slice(rank * 6, (rank + 1) * 6)
    loss = sh(x[rows], y[rows])
    drawn = sh.sampled[::K] // K  # the drawn classes (local ids), each followed by its other rows
    whole = torch.equal(sh.sampled, subcenter_rows(drawn, K).flatten())
    mine = (drawn + a).tolist()
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    kept = torch.tensor(sorted(c for part in every for c in part))
    ref = MarginHead(len(kept), D, impl="reference", subcenters=K).double()
    with torch.no_grad():
        ref.weight.copy_(w[subcenter_rows(kept, K).flatten()])
    ref_loss = ref(x, torch.searchsorted(kept, y)).detach()
    again = ShardedMarginHead(classes, D, impl="chunked", sample_rate=0.1, seed=7, subcenters=K).double()
    again.set_step(3)
    again(x[rows], y[rows])
    owned = y[(y >= a) & (y < b)] - a
    return {
        "loss_rel": rel(loss.detach(), ref_loss),
        "kept": len(mine),
        "local": b - a,
        "positives": sorted(set(owned.tolist())),
        "sampled": sorted(drawn.tolist()),
        "whole_classes": whole,
        "same_seed_same_sample": bool(torch.equal(again.sampled, sh.sampled)),
    }


def check_sgd_step_and_state(rank: int, world: int, out: Path, K: int = 1) -> dict:
    """One SGD (momentum, weight decay) step of the sharded head equals the full head's; the gathered
    per-class state equals the full head's weight and momentum. The step runs through `sampled_rows`
    with a sample that holds every class (positives cover them all), so that path is checked too."""
    x, w, y = global_data(world, 7, per_rank=8, seed=2, subcenters=K)
    y[:7] = torch.arange(7)
    a, b = row_range(7 * K, K, rank, world)
    rows = slice(rank * 8, (rank + 1) * 8)
    res = {}
    for rate in (1.0, 0.1):
        ref = MarginHead(7, D, impl="reference", subcenters=K).double()
        sh = ShardedMarginHead(7, D, impl="chunked", sample_rate=rate, subcenters=K).double()
        with torch.no_grad():
            ref.weight.copy_(w)
            sh.weight.copy_(w[a:b])
        opts = [torch.optim.SGD(h.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01) for h in (ref, sh)]
        for _ in range(2):
            for h, opt, xx, yy in ((ref, opts[0], x, y), (sh, opts[1], x[rows], y[rows])):
                opt.zero_grad()
                h(xx, yy).backward()
                with sampled_rows(opt, h.weight, getattr(h, "sampled", None)):
                    opt.step()
        state = gather_class_state(sh.weight, opts[1], 7 * K, subcenters=K)
        if rank == 0:
            mom = opts[0].state[ref.weight]["momentum_buffer"]
            res[f"rate{rate}"] = [
                rel(state["rows"]["weight"], ref.weight.detach()),
                rel(state["rows"]["optim.momentum_buffer"], mom),
                sh.sampled is None or set(sh.sampled.tolist()) == set(range(b - a)),
            ]
            torch.save(state, out / f"state_rate{rate}{'_k' + str(K) if K > 1 else ''}.pt")
    return res


def check_dominant_subcenters(rank: int, world: int, K: int = 2) -> dict:
    """The sharded head's dominant_subcenters (a collective over every rank's rows) is the rows of the
    single-process head's, with its margin state; the one-row sharded head computes MarginHead's loss."""
    x, w, y = global_data(world, subcenters=K)
    a, b = class_range(C, rank, world)
    rows = slice(rank * B, (rank + 1) * B)
    full = MarginHead(C, D, "adaface", impl="chunked", subcenters=K).double()
    sh = ShardedMarginHead(C, D, "adaface", impl="chunked", subcenters=K).double()
    with torch.no_grad():
        full.weight.copy_(w)
        sh.weight.copy_(w[a * K : b * K])
    full(x, y), sh(x[rows], y[rows])  # training forwards: the running state moves alike
    single, one = full.dominant_subcenters(x, y), sh.dominant_subcenters(x[rows], y[rows])
    loss_full, loss_sh = single.double()(x, y), one.double()(x[rows], y[rows])
    buffers = zip(one.named_buffers(), single.named_buffers())
    return {
        "same_rows": torch.equal(one.weight, single.weight[a:b]) and one.subcenters == 1,
        "same_state": all(torch.equal(p, q) for (_, p), (_, q) in buffers),
        "loss_rel": rel(loss_sh.detach(), loss_full.detach()),
    }


def check_seeded_start(rank: int, world: int) -> dict:
    """The trainer's heads as built (trainer.head_parallel.build_head) from the same seed, with torch's
    global generator seeded differently on every rank: the sharded head's rows are exactly the
    replicated head's rows [a, b), and the first loss on the same global batch is the same."""
    from trainer.head_parallel import build_head

    classes, dim, seed = 23, D, 5
    kwargs = {"margin": "arcface", "impl": "chunked", "block": 4}
    x, _, y = global_data(world, classes, per_rank=B, seed=3)
    x = x.float()
    torch.manual_seed(1000 + rank)  # the trainer seeds torch with seed + rank: the head must not use it
    replicated = build_head("replicate", classes, dim, kwargs, 1.0, seed)
    sharded = build_head("shard", classes, dim, kwargs, 1.0, seed)
    a, b = class_range(classes, rank, world)
    rows = slice(rank * B, (rank + 1) * B)
    first_rep = float(replicated(x, y))
    first_sh = float(sharded(x[rows], y[rows]))
    other_seed = build_head("replicate", classes, dim, kwargs, 1.0, seed + 1)
    return {
        "same_rows": torch.equal(sharded.weight, replicated.weight[a:b]),
        "rows": [a, b],
        "other_seed_differs": not torch.equal(other_seed.weight, replicated.weight),
        "first_loss": [first_rep, first_sh],
    }


def train(opts: dict, argv: list[str]) -> int:
    import heads.sharded as sharded
    from tests._trainer_faults import FaultHooks
    from trainer import engine, head_parallel
    from trainer.main import main as train_main

    if opts.get("dump_after_resume"):
        start = engine.Trainer._start

        def start_and_dump(self) -> None:
            start(self)
            full = head_parallel.head_checkpoint(self.parts.head, self.parts.optimizer)
            if full is not None:
                torch.save(full, opts["dump_after_resume"])

        engine.Trainer._start = start_and_dump
    if "record_step" in opts:  # the samples this rank trains on at that (0-based) step
        next_batch = engine.Trainer._next_batch

        def next_and_record(self):
            images, labels = next_batch(self)
            if self.state.step == opts["record_step"]:
                rows = [[int(y), round(float(x.double().sum()), 3)] for x, y in zip(images, labels)]
                Path(self.run_dir, f"batch-rank{self.info.rank}.json").write_text(json.dumps(rows))
            return images, labels

        engine.Trainer._next_batch = next_and_record
    if int(os.environ.get("RANK", "0")) == opts.get("kill_rank", -1):
        gather, calls = sharded.gather_labels, [0]

        def gather_or_die(labels, group=None):
            calls[0] += 1
            if calls[0] >= opts["kill_at_call"]:
                os.kill(os.getpid(), getattr(signal, opts.get("signal", "SIGKILL")))
            return gather(labels, group)

        sharded.gather_labels = gather_or_die
    return train_main(argv, hooks=FaultHooks(**opts.get("faults", {})))


def main() -> int:
    if sys.argv[1] == "train":
        return train(json.loads(sys.argv[2]), sys.argv[3:])
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {
        "margins": check_margins(rank, world),
        "sampled": check_sampled_vs_reference(rank, world),
        "sgd": check_sgd_step_and_state(rank, world, out),
        "start": check_seeded_start(rank, world),
        "margins_k2": check_margins(rank, world, K=2),
        "sampled_k2": check_sampled_vs_reference(rank, world, K=2),
        "sgd_k2": check_sgd_step_and_state(rank, world, out, K=2),
        "dominant_k2": check_dominant_subcenters(rank, world),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
