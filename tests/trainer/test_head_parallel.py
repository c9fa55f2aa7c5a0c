"""The trainer with head.parallel=shard (torchrun, gloo, CPU): the same training as replicate, head
checkpoints that resume on another number of ranks, Partial FC's sparse step, and a kill -9 of one
rank during the head's collectives ending the job. (What a resume refuses, in one line, is
tests/trainer/test_checkpoint.py's.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.cli import UserError
from heads.margin_head import init_centres
from models.model_file import load_embedding_model
from tests._heads_util import needs_grad_dtype
from tests._trainer_util import ROOT, env, metrics, tiny_overrides
from trainer.main import main as train_main

WORKER = ["-m", "tests._heads_sharded_worker"]  # a module: see tests/heads/test_sharded.py
# 11 classes (not divisible by 2 or 3), 264 samples: a global batch of 48 gives 5 steps per epoch on
# 1, 2 or 3 ranks; a low LR and noisy images keep the loss away from 0 (where ratios are meaningless)
BASE = {
    "data.synthetic.classes": 11,
    "data.synthetic.per_class": 24,
    "data.synthetic.noise": 1.5,
    "loader.batch_size": 24,
    "optim.lr": 0.01,
    "optim.clip_grad_norm": 5.0,
    "checkpoint.every_steps": 10,
}


def _train(world: int, run: Path, opts: dict, steps: int, **extra: object) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if world > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    args = tiny_overrides(run, steps=steps, **{**BASE, **extra})
    cmd = [*launcher, *WORKER, "train", json.dumps(opts), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env(), cwd=ROOT)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    # relative to the tensor's scale, floored: some BN biases are round-off noise (~1e-9)
    return float((a.double() - b.double()).abs().max()) <= rel * max(float(b.abs().max()), 1e-3)


@pytest.mark.slow
def test_shard_trains_like_replicate(tmp_path: Path) -> None:
    """Slow: two torchrun launches of 2 ranks (~20 s each on 2 cores). 4 steps, 2 micro-batches
    each, clipping at 0.5 (the whole model's norm, the head's summed over its shards): the backbone
    and the per-class head (weights, momentum) of the sharded run equal the replicated run's to 1e-4
    of their scale (fp32 round-off; over tens of steps the two drift apart chaotically, so the run
    is short). The logged loss and batch accuracy are the global batch's in both modes (the
    replicated run averages its ranks' figures), so the two logs agree."""
    last, logged = {}, {}
    for mode in ("replicate", "shard"):
        run = tmp_path / mode
        err = _ok(
            _train(
                2,
                run,
                {"faults": {"dump_params": True}},
                4,
                **{
                    "head.parallel": mode,
                    "optim.accumulate": 2,
                    "optim.clip_grad_norm": 0.5,
                    "checkpoint.every_steps": 4,
                },
            )
        )
        last[mode] = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
        logged[mode] = [(r["loss"], r["batch_acc"]) for r in metrics(run) if "loss" in r]
        assert f"head: {mode}, {11 if mode == 'replicate' else 6} of 11 classes on this rank" in err
        assert " per step (" in err and "optimizer state " in err
    rep, sh = last["replicate"], last["shard"]
    assert len(logged["shard"]) == len(logged["replicate"]) >= 2
    for (loss_s, acc_s), (loss_r, acc_r) in zip(logged["shard"], logged["replicate"]):
        assert loss_s == pytest.approx(loss_r, rel=1e-4) and acc_s == pytest.approx(acc_r, abs=1e-6)
    model, spec = load_embedding_model(tmp_path / "shard" / "checkpoints" / "last.pt")  # what eval/ reads
    assert spec["backbone"] == "tiny" and model(torch.zeros(1, 3, 32, 32)).shape == (1, 32)
    for key, value in rep["backbone_state"].items():
        if value.is_floating_point():
            assert _close(sh["backbone_state"][key], value, 1e-4), key
    for key, value in rep["head_state"]["rows"].items():
        got = sh["head_state"]["rows"][key]
        assert got.shape == (11, 32) and _close(got, value, 1e-4), key
    p0, p1 = (torch.load(tmp_path / "shard" / f"params-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert p0["head.weight"].shape == (6, 32) and p1["head.weight"].shape == (5, 32)
    assert all(torch.equal(p0[k], p1[k]) for k in p0 if k.startswith("backbone."))


@pytest.mark.slow
def test_resume_two_ranks_on_one_and_on_three(tmp_path: Path) -> None:
    """Slow: 30 steps on 2 ranks, then resumes on 1 and 3 ranks (~60 s on 2 cores).

    The global batch stays 48 (2 x 24 -> 1 x 48 -> 3 x 16). The loader splits one per-epoch
    permutation into global batches of batch_size x processes samples and deals each out to the
    ranks, so global batch k holds the same samples for every process count (only which rank gets
    which differs): checked on the recorded step-31 batches. The per-class weights and momentum after
    loading equal the saved ones exactly. The next loss agrees only to 25%: BatchNorm normalizes
    each rank's own batch, and 2 x 24 samples give other statistics than 1 x 48 (SyncBatchNorm
    does not run on the CPU); with the same ranks a resume is exact (tests/trainer/test_resume.py)."""
    base = tmp_path / "two"
    _ok(_train(2, base, {"record_step": 30}, 31))  # step-00000030.pt, then the uninterrupted step 31
    saved_path = base / "checkpoints" / "step-00000030.pt"
    saved = torch.load(saved_path, weights_only=True)["head_state"]
    two_ranks = sorted(r for k in (0, 1) for r in json.loads((base / f"batch-rank{k}.json").read_text()))
    next_loss = metrics(base)[-1]
    assert next_loss["step"] == 31
    for world, batch in ((1, 48), (3, 16)):
        run = tmp_path / f"on{world}"
        dump = tmp_path / f"loaded{world}.pt"
        err = _ok(
            _train(
                world,
                run,
                {"dump_after_resume": str(dump), "record_step": 30},
                31,
                **{"loader.batch_size": batch, "checkpoint.resume": str(saved_path)},
            )
        )
        assert "resumed from" in err and f"{world} process(es)" in err
        loaded = torch.load(dump, weights_only=True)
        assert loaded["num_classes"] == 11 and loaded["rows"].keys() == saved["rows"].keys()
        for key, value in saved["rows"].items():
            assert torch.equal(loaded["rows"][key], value), (world, key)
        got = sorted(r for k in range(world) for r in json.loads((run / f"batch-rank{k}.json").read_text()))
        assert got == two_ranks, "the same samples in global batch 31"
        first = metrics(run)[0]
        assert first["step"] == 31
        assert first["loss"] == pytest.approx(next_loss["loss"], rel=0.25), world


# one rank, sharded, Partial FC at 0.5 of 40 classes, batches of 8, a checkpoint every step
PARTIAL_FC = {
    **BASE,
    "data.synthetic.classes": 40,
    "data.synthetic.per_class": 4,
    "loader.batch_size": 8,
    "head.parallel": "shard",
    "head.sample_rate": 0.5,
    "checkpoint.every_steps": 1,
}


def test_partial_fc_steps_only_the_sampled_centres(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One rank, head.parallel=shard, sample_rate 0.5 of 40 classes, batches of 8: after one step
    exactly 20 centres moved and have momentum; the other 20 are the initial centres, momentum 0."""
    run = tmp_path / "run"
    extra = PARTIAL_FC
    assert train_main(tiny_overrides(run, steps=1, **extra)) == 0
    assert "sample rate 0.5" in capsys.readouterr().err
    rows = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["head_state"]["rows"]
    moved = rows["optim.momentum_buffer"].abs().sum(1) > 0
    assert int(moved.sum()) == 20
    start = init_centres(40, 32, 0, 40, seed=0)
    assert torch.equal(rows["weight"][~moved], start[~moved])
    assert not torch.equal(rows["weight"][moved], start[moved])
    # replicate cannot sample: one line
    again = tiny_overrides(tmp_path / "rep", steps=1, **{**extra, "head.parallel": "replicate"})
    assert train_main(again) == 2
    assert "head.sample_rate=0.5: Partial FC needs head.parallel=shard" in capsys.readouterr().err


def test_subcenters_train_sharded_with_partial_fc_and_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """One rank, head.parallel=shard, head.subcenters=2, Partial FC at 0.5 of 40 classes: a step
    moves exactly the sampled classes' rows, both rows of each (a class's K rows are sampled
    together); the checkpoint holds 40 x 2 rows, and a second run resumes from it."""
    run = tmp_path / "run"
    extra = {**PARTIAL_FC, "head.subcenters": 2}
    assert train_main(tiny_overrides(run, steps=1, **extra)) == 0
    assert "head: shard, 40 of 40 classes (2 sub-centers each) on this rank" in capsys.readouterr().err
    head = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["head_state"]
    assert head["subcenters"] == 2 and head["num_classes"] == 80 and head["rows"]["weight"].shape == (80, 32)
    moved = (head["rows"]["optim.momentum_buffer"].abs().sum(1) > 0).view(40, 2)
    assert int(moved.all(1).sum()) == 20 and torch.equal(moved.all(1), moved.any(1)), "whole classes"
    start = init_centres(80, 32, 0, 80, seed=0)
    still = ~moved.flatten()
    assert torch.equal(head["rows"]["weight"][still], start[still])
    assert train_main(tiny_overrides(run, steps=2, **extra)) == 0
    assert "resumed from" in capsys.readouterr().err
    again = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["head_state"]
    assert again["rows"]["weight"].shape == (80, 32) and not torch.equal(again["rows"]["weight"], start)


@pytest.mark.slow
def test_kill_9_of_one_rank_in_the_head_collectives_ends_the_job(tmp_path: Path) -> None:
    """Slow: a 2-rank torchrun launch (~20 s on 2 cores). Rank 1 SIGKILLs itself entering the head's
    labels all-gather of step 3; rank 0 is then inside the head's collectives. torchrun sees the dead
    worker, ends rank 0 and names the cause; the gloo connection closes at once, and the process
    group's timeout (run.collective_timeout_s) bounds the wait of a rank whose peer stalls instead."""
    t0 = time.monotonic()
    proc = _train(
        2, tmp_path / "run", {"kill_rank": 1, "kill_at_call": 3}, 20, **{"run.collective_timeout_s": 10}
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0 and elapsed < 120
    assert "Signal 9 (SIGKILL) received by PID" in proc.stderr and "rank      : 1" in proc.stderr
    assert "done:" not in proc.stderr
    assert max(r["step"] for r in metrics(tmp_path / "run")) == 2


@pytest.mark.parametrize("max_norm", [float("inf"), 0.05])
def test_clip_is_torchs_and_hands_the_head_factor_to_an_optimizer_that_takes_it(max_norm: float) -> None:
    """clip_grad_norm: torch's norm; with clipping on, torch's in-place multiply for the gradients an
    optimizer does not take into its step, and the factor torch would use for those it takes
    (FusedHeadSGD.defer_grad_scale: the head's); with clipping off no multiply at all (torch's
    clip_grad_norm_ would multiply every gradient by 1)."""
    from trainer.head_parallel import clip_grad_norm

    backbone, head = [torch.nn.Parameter(torch.randn(5, 3))], [torch.nn.Parameter(torch.randn(7, 3))]
    mirror = [torch.nn.Parameter(p.detach().clone()) for p in backbone + head]
    for p in backbone + head + mirror:
        p.grad = torch.ones_like(p) * 0.3
    grads = [p.grad for p in backbone + head]
    want = torch.nn.utils.clip_grad_norm_(mirror, max_norm)

    class TakesTheHead:
        def __init__(self) -> None:
            self.taken: dict = {}

        def defer_grad_scale(self, p, scale):
            if p is head[0]:
                self.taken[p] = scale
            return p is head[0]

    opt = TakesTheHead()
    got = clip_grad_norm(backbone, head, max_norm, sharded=False, optimizer=opt)
    assert torch.equal(got, want) and all(p.grad is g for p, g in zip(backbone + head, grads))
    assert torch.equal(backbone[0].grad, mirror[0].grad)  # torch's multiply (by 1: none)
    assert torch.equal(head[0].grad, torch.full_like(head[0].grad, 0.3)), "the step multiplies it"
    if max_norm == float("inf"):
        assert not opt.taken
    else:
        assert torch.equal(head[0].grad * opt.taken[head[0]], mirror[1].grad)


@needs_grad_dtype
def test_partial_fc_steps_a_bf16_head_gradient(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """head.grad_dtype=bfloat16 on a sharded head with Partial FC (one rank): the start-up line counts
    a 2-byte gradient, the sampled centres step (their stand-in's gradient widened to fp32) and the
    checkpoint's momentum is fp32."""
    run = tmp_path / "run"
    assert train_main(tiny_overrides(run, steps=1, **PARTIAL_FC, **{"head.grad_dtype": "bfloat16"})) == 0
    assert "per rank weight 5.0 KiB, gradient 2.5 KiB, optimizer state 5.0 KiB" in capsys.readouterr().err
    rows = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["head_state"]["rows"]
    momentum = rows["optim.momentum_buffer"]
    assert momentum.dtype == torch.float32 and int((momentum.abs().sum(1) > 0).sum()) == 20


@needs_grad_dtype
def test_bf16_head_gradient_is_set_on_the_heads_own_weight_and_refused_in_ddp() -> None:
    """keep_gradient_in: the leaf weight's grad_dtype (a sharded head's own rows); float32 leaves the
    weight as it is; a head replicated over several processes (in DDP, whose buckets hold the
    weight's float32) is refused in one line."""
    from heads import MarginHead
    from heads.sharded import ShardedMarginHead
    from trainer.head_parallel import keep_gradient_in

    sharded = ShardedMarginHead(12, 8, impl="chunked")
    keep_gradient_in(sharded, "bfloat16", "shard", 2)
    assert sharded.weight.grad_dtype == torch.bfloat16
    sharded(torch.randn(4, 8), torch.randint(0, 12, (4,))).backward()
    assert sharded.weight.grad.dtype == torch.bfloat16
    replicated = MarginHead(12, 8, impl="chunked")
    keep_gradient_in(replicated, "float32", "replicate", 2)
    keep_gradient_in(replicated, "bfloat16", "replicate", 1)  # one process: no DDP
    assert replicated.weight.grad_dtype == torch.bfloat16
    with pytest.raises(UserError, match=r"^head.grad_dtype=bfloat16 with head.parallel=replicate on 2 proc"):
        keep_gradient_in(MarginHead(12, 8), "bfloat16", "replicate", 2)


@needs_grad_dtype
@pytest.mark.parametrize("sharded", [False, True])
def test_clip_norm_of_a_bf16_head_gradient_is_its_fp32_norm(sharded: bool) -> None:
    """torch's get_total_norm of a bf16 gradient is a bf16 number (3 significant digits); the clip's
    norm of the head's bf16 gradient is the fp32 norm of the same values (to fp32 round-off of the
    summation order), fp32, whole or sharded; the clip multiplies the bf16 gradient in place."""
    from trainer.head_parallel import clip_grad_norm

    g = torch.Generator().manual_seed(0)
    backbone = [torch.nn.Parameter(torch.randn(5, 3, generator=g))]
    head = [torch.nn.Parameter(torch.randn(4000, 16, generator=g))]
    head[0].grad_dtype = torch.bfloat16
    backbone[0].grad = torch.randn(5, 3, generator=g)
    head[0].grad = torch.randn(4000, 16, generator=g).to(torch.bfloat16)
    values = [backbone[0].grad.clone(), head[0].grad.float()]
    want = torch.nn.utils.get_total_norm(values)
    got = clip_grad_norm(backbone, head, float("inf"), sharded=sharded)
    assert got.dtype == torch.float32 and float(got) == pytest.approx(float(want), rel=1e-6)
    clip_grad_norm(backbone, head, 1.0, sharded=sharded)
    factor = 1.0 / (float(want) + 1e-6)
    assert head[0].grad.dtype == torch.bfloat16
    assert torch.allclose(head[0].grad.float(), values[1] * factor, rtol=2**-8, atol=0)
    assert torch.allclose(backbone[0].grad, values[0] * factor, rtol=1e-6)
