"""heads/sharded.py: the class-sharded head against the single-process MarginHead (float64) through
torchrun on 1, 2 and 3 ranks (gloo, CPU), a sharded head's start equal to the replicated one's from
the same seed, and on one process: the class ranges, the world-size independent initial centres and
per-class state, Partial FC sampling and its sparse optimizer step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import heads.sharded
from heads.margin_head import init_centres
from heads.sharded import (
    ShardedMarginHead,
    class_range,
    head_bytes,
    load_class_state,
    sample_classes,
    sampled_rows,
    select_rows,
    slice_class_state,
    step_traffic,
)
from tests._heads_util import needs_grad_dtype

# run as a module from ROOT: as a script, tests/ would come first on the path and tests/heads/
# would shadow the heads package
WORKER = ["-m", "tests._heads_sharded_worker"]
ROOT = Path(__file__).resolve().parents[2]


def _torchrun(world: int, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world}",
        *WORKER,
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory):
    """The worker's results on `world` ranks, launched once per world size for this module's tests."""
    done: dict[int, list[dict]] = {}

    def results(world: int) -> list[dict]:
        if world not in done:
            done[world] = _torchrun(world, tmp_path_factory.mktemp(f"world{world}"))
        return done[world]

    return results


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=SLOW), pytest.param(3, marks=SLOW)])
def test_sharded_equals_single_process_head(world: int, launch) -> None:
    """Slow for 2 and 3 ranks: torchrun starts that many Python processes and a gloo rendezvous
    (~17 s and ~23 s on 2 cores); one launch checks every margin, the sampling and the SGD step, with
    one row a class and with K = 2 sub-centers (and then the sharded dominant_subcenters).

    Tolerances: gradients 1e-12 relative. The loss 1e-9: the combined margin's acos amplifies the last
    bit of the fallback row's c_y = -1 (d acos/dc is unbounded there); the chunked MarginHead differs
    from the reference by the same 2e-10."""
    ranks = launch(world)
    for k in ("", "_k2"):  # one row a class, and K = 2 sub-centers (a rank owns whole classes)
        for r, res in enumerate(ranks):
            for name, (d_loss, d_x, d_w, d_state) in res["margins" + k].items():
                assert d_loss < 1e-9 and d_x < 1e-12 and d_w < 1e-12, (world, r, k, name, d_loss, d_x, d_w)
                assert d_state < 1e-14, (world, r, k, name, "the running state moves alike", d_state)
            s = res["sampled" + k]
            assert s["loss_rel"] < 1e-12, "the sampled loss is MarginHead's over exactly the kept classes"
            assert set(s["positives"]) <= set(s["sampled"]), "every positive is kept"
            assert s["kept"] == int(0.1 * s["local"]) == len(s["sampled"]), "positives + negatives = 10%"
            assert s["same_seed_same_sample"] and s["whole_classes"]
        assert sum(res["sampled" + k]["local"] for res in ranks) == 1000
        for rate in ("rate1.0", "rate0.1"):
            d_w, d_mom, all_classes = ranks[0]["sgd" + k][rate]
            assert d_w < 1e-12 and d_mom < 1e-12 and all_classes, (world, k, rate, d_w, d_mom)
        if world > 1:  # the ranks drew different negatives
            assert ranks[0]["sampled" + k]["sampled"] != ranks[1]["sampled" + k]["sampled"]
    for r, res in enumerate(ranks):  # the cleaning step, sharded: the single-process head's rows
        dom = res["dominant_k2"]
        assert dom["same_rows"] and dom["same_state"] and dom["loss_rel"] < 1e-12, (world, r, dom)


@pytest.mark.parametrize("world", [pytest.param(2, marks=SLOW), pytest.param(3, marks=SLOW)])
def test_sharded_head_starts_like_a_replicated_one_with_the_same_seed(world: int, launch) -> None:
    """Slow: torchrun on 2 and 3 ranks (shared with the test above). The trainer's heads
    (head_parallel.build_head) from one seed, with torch's global generator seeded per rank: each
    rank's sharded rows are exactly the replicated head's rows of its classes, so the first loss on
    the same global batch agrees (to fp32 round-off: the sharded log-sum-exp adds in another order);
    another seed gives other centres."""
    ranks = launch(world)
    assert [res["start"]["rows"] for res in ranks] == [list(class_range(23, r, world)) for r in range(world)]
    for r, res in enumerate(ranks):
        start = res["start"]
        assert start["same_rows"], (world, r, "the shard's centres are the replicated head's rows")
        assert start["other_seed_differs"]
        replicated, sharded = start["first_loss"]
        assert sharded == pytest.approx(replicated, rel=1e-6), (world, r)
    first = {res["start"]["first_loss"][0] for res in ranks}
    assert len(first) == 1, "every rank's replicated head is the same, whatever its global seed"


def test_class_ranges_cover_every_class_once_uneven() -> None:
    for C, world in [(11, 1), (11, 2), (11, 3), (2, 3), (10, 5)]:
        ranges = [class_range(C, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == C
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [b - a for a, b in ranges]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert [class_range(11, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 11)]


def test_initial_centres_do_not_depend_on_the_world_size() -> None:
    C = (1 << 16) + 5  # crosses a seeded block
    full = init_centres(C, 2, 0, C, seed=3)
    for world in (2, 3):
        parts = [init_centres(C, 2, *class_range(C, r, world), seed=3) for r in range(world)]
        assert torch.equal(torch.cat(parts), full)
    assert not torch.equal(init_centres(C, 2, 0, C, seed=4), full)
    assert 0.009 < float(full.std()) < 0.011


def test_sample_keeps_positives_and_the_expected_negatives_deterministically() -> None:
    positives = torch.tensor([3, 3, 50, 999, 7])
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    idx = sample_classes(positives, 1000, 0.1, g(0))
    assert idx is not None and len(idx) == 100 and bool((idx[1:] > idx[:-1]).all())
    assert set(positives.tolist()) <= set(idx.tolist())
    assert torch.equal(idx, sample_classes(positives, 1000, 0.1, g(0)))
    assert not torch.equal(idx, sample_classes(positives, 1000, 0.1, g(1)))
    assert sample_classes(positives, 1000, 1.0, g(0)) is None
    many = torch.arange(0, 40)
    assert torch.equal(sample_classes(many, 100, 0.1, g(0)), many), "more positives than the rate: all"


def test_head_sample_is_reproducible_per_seed_and_step() -> None:
    x, y = torch.randn(8, 4), torch.randint(0, 500, (8,))

    def sample(seed: int, step: int) -> torch.Tensor:
        head = ShardedMarginHead(500, 4, sample_rate=0.1, seed=seed, impl="chunked")
        head.set_step(step)
        head(x, y)
        return head.sampled

    assert torch.equal(sample(1, 5), sample(1, 5))
    assert not torch.equal(sample(1, 5), sample(1, 6))
    assert not torch.equal(sample(1, 5), sample(2, 5))


def test_sample_of_a_step_is_the_union_over_its_micro_batches() -> None:
    head = ShardedMarginHead(500, 4, sample_rate=0.1, impl="chunked")
    x, y = torch.randn(8, 4), torch.randint(0, 500, (8,))
    head(x, y)
    first = head.sampled
    head(x, y)  # a second micro-batch of the same step draws other negatives
    assert set(first.tolist()) < set(head.sampled.tolist())
    head.set_step(1)
    head(x, y)
    assert len(head.sampled) == 50, "a new step starts a new sample"


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_sampled_step_leaves_unsampled_rows_and_their_state_untouched(opt_name: str) -> None:
    torch.manual_seed(0)
    head = ShardedMarginHead(200, 8, sample_rate=0.1, impl="chunked", block=32)
    if opt_name == "sgd":
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=5e-4)
    for step in range(3):
        head.set_step(step)
        before_w = head.weight.detach().clone()
        before_state = {k: v.clone() for k, v in opt.state.get(head.weight, {}).items()}
        opt.zero_grad()
        head(torch.randn(16, 8), torch.randint(0, 200, (16,))).backward()
        idx = head.sampled
        with sampled_rows(opt, head.weight, idx):
            opt.step()
        rest = torch.ones(200, dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(head.weight[rest], before_w[rest]), "unsampled centres do not move"
        assert bool((head.weight[idx] != before_w[idx]).any(1).all()), "every sampled centre moves"
        for k, v in opt.state[head.weight].items():
            if v.shape == head.weight.shape:
                old = before_state.get(k, torch.zeros_like(v))
                assert torch.equal(v[rest], old[rest]), (k, "unsampled state untouched")
        assert opt.param_groups[0]["params"][0] is head.weight
    assert set(opt.state) == {head.weight}


@pytest.mark.parametrize(
    "grad_dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_grad_dtype)], ids=str
)
def test_sampled_step_rows_follow_sgd(grad_dtype: torch.dtype) -> None:
    """The sampled rows get exactly the dense SGD update of those rows; a bf16 gradient
    (head.grad_dtype) steps as its fp32 values, the momentum fp32."""
    torch.manual_seed(1)
    head = ShardedMarginHead(50, 4, sample_rate=0.2, impl="chunked")
    if grad_dtype != torch.float32:
        head.weight.grad_dtype = grad_dtype
    dense = torch.nn.Parameter(head.weight.detach().clone())
    opt = torch.optim.SGD([head.weight], lr=0.3, momentum=0.9, weight_decay=0.01)
    ref = torch.optim.SGD([dense], lr=0.3, momentum=0.9, weight_decay=0.01)
    head(torch.randn(6, 4), torch.randint(0, 50, (6,))).backward()
    idx = head.sampled
    assert head.weight.grad.dtype == grad_dtype
    dense.grad = head.weight.grad.to(torch.float32, copy=True)
    with sampled_rows(opt, head.weight, idx):
        opt.step()
    ref.step()
    assert torch.equal(head.weight[idx], dense[idx])
    mom, ref_mom = opt.state[head.weight]["momentum_buffer"], ref.state[dense]["momentum_buffer"]
    assert mom.dtype == torch.float32 and torch.equal(mom[idx], ref_mom[idx])


def _plain_gather(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The sampled rows as Partial FC took them before select_rows: torch's index backward fills an
    fp32 tensor of the weight's shape, cast to the gradient's dtype only as weight.grad."""
    return weight[index]


def _partial_fc_step(
    gather, grad_dtype: torch.dtype = torch.float32, subcenters: int = 1
) -> tuple[ShardedMarginHead, torch.Tensor, torch.Tensor]:
    """(head, embeddings, loss) of one Partial FC forward taking its rows with `gather`: a fixed
    head, batch and draw (300 classes, rate 0.1), so two calls differ only by the gather."""
    head = ShardedMarginHead(300, 8, sample_rate=0.1, subcenters=subcenters, impl="chunked", block=32)
    if grad_dtype != torch.float32:
        head.weight.grad_dtype = grad_dtype
    head.set_step(4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 8, generator=g).requires_grad_()
    y = torch.randint(0, 300, (12,), generator=g)
    y[1] = y[0]  # a class twice in the batch: its row's gradient sums two samples
    saved, heads.sharded.select_rows = heads.sharded.select_rows, gather
    try:
        return head, x, head(x, y)
    finally:
        heads.sharded.select_rows = saved


@pytest.mark.parametrize("subcenters", [1, 2])
def test_select_rows_gradient_is_bitwise_the_plain_gather(subcenters: int) -> None:
    """With the default fp32 gradient Partial FC's loss and gradients are bitwise what the plain
    weight[index] gather gave; a repeated row adds up exactly as in torch's index backward."""
    grads = []
    for gather in (_plain_gather, select_rows):
        head, x, loss = _partial_fc_step(gather, subcenters=subcenters)
        loss.backward()
        grads.append((loss.detach(), head.weight.grad, x.grad, head.sampled))
    (loss0, dw0, dx0, rows0), (loss1, dw1, dx1, rows1) = grads
    assert torch.equal(rows0, rows1) and len(rows1) == 30 * subcenters
    assert dw1.dtype == torch.float32 and bool(dw1[rows1].ne(0).any(1).all()), "every sampled row moves"
    assert torch.equal(loss0, loss1) and torch.equal(dw0, dw1) and torch.equal(dx0, dx1)
    weight = torch.randn(20, 4, requires_grad=True)
    index, g = torch.tensor([3, 7, 3, 19, 3, 0]), torch.randn(6, 4)
    select_rows(weight, index).backward(g)
    plain = weight.grad
    weight.grad = None
    weight[index].backward(g)
    assert torch.equal(plain, weight.grad) and torch.equal(plain[3], g[0] + g[2] + g[4])


@needs_grad_dtype
def test_select_rows_bf16_gradient_is_the_fp32_one_rounded() -> None:
    """head.grad_dtype bf16: weight.grad is bf16 and equals the fp32 gradient rounded to bf16 (each
    sampled row's dW is one value, summed in fp32 by the engine, so one rounding: exactly equal)."""
    head32, _, loss32 = _partial_fc_step(select_rows)
    loss32.backward()
    head16, _, loss16 = _partial_fc_step(select_rows, torch.bfloat16)
    loss16.backward()
    assert head16.weight.grad.dtype == torch.bfloat16
    assert torch.equal(head16.weight.grad, head32.weight.grad.to(torch.bfloat16))


class _OutputRecorder(TorchDispatchMode):
    """Records the shape and dtype of every tensor each op returns (autograd's backward ops too:
    dispatch modes, unlike torch function modes, see the ops autograd runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[tuple[int, ...], torch.dtype, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.outputs.append((tuple(t.shape), t.dtype, str(func)))
        return out


@needs_grad_dtype
def test_bf16_partial_fc_backward_makes_no_fp32_tensor_of_the_weights_shape() -> None:
    """The point of select_rows: with head.grad_dtype bf16 the backward creates no fp32 C x D tensor
    (2 GB at 1M classes x 512); the plain gather creates one, so this check can fail."""

    def fp32_full_size_ops(gather) -> list[str]:
        head, _, loss = _partial_fc_step(gather, torch.bfloat16)
        with _OutputRecorder() as recorder:
            loss.backward()
        assert head.weight.grad.dtype == torch.bfloat16
        full = tuple(head.weight.shape)
        return [op for shape, dtype, op in recorder.outputs if shape == full and dtype == torch.float32]

    assert fp32_full_size_ops(_plain_gather), "the plain gather's index backward fills an fp32 C x D"
    assert fp32_full_size_ops(select_rows) == []


def test_class_state_slices_for_any_world_and_rejects_another_head() -> None:
    C, D = 11, 3
    g = torch.Generator().manual_seed(0)
    full = {
        "num_classes": C,
        "rows": {
            "weight": torch.randn(C, D, generator=g),
            "optim.momentum_buffer": torch.randn(C, D, generator=g),
        },
        "scalars": {},
    }
    for world in (1, 2, 3):
        weights, moms = [], []
        for r in range(world):
            a, b = class_range(C, r, world)
            w = torch.nn.Parameter(torch.zeros(b - a, D))
            opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
            load_class_state(w, opt, full, C, r, world)
            weights.append(w.detach())
            moms.append(opt.state[w]["momentum_buffer"])
            assert torch.equal(slice_class_state(full, r, world)["rows"]["weight"], w.detach())
        assert torch.equal(torch.cat(weights), full["rows"]["weight"])
        assert torch.equal(torch.cat(moms), full["rows"]["optim.momentum_buffer"])
    w = torch.nn.Parameter(torch.zeros(4, D))
    other = {**full, "num_classes": 12, "rows": {"weight": torch.zeros(12, D)}}
    with pytest.raises(ValueError, match="12 classes x 3 dims, this run's 11 x 3"):
        load_class_state(w, None, other, C, 0, 3)  # the same shard shape (4 rows), another head
    with pytest.raises(ValueError, match="another class count or embedding size"):
        load_class_state(torch.nn.Parameter(torch.zeros(6, 4)), None, full, C, 0, 2)


def test_memory_and_traffic_figures() -> None:
    rep = head_bytes(2_000_000, 512, 8, "replicate")
    shard = head_bytes(2_000_000, 512, 8, "shard")
    assert rep["weight"] == 2_000_000 * 512 * 4 and shard["weight"] == 250_000 * 512 * 4
    assert rep["total"] == 3 * rep["weight"] and shard["total"] * 8 == rep["total"]
    bf16_grad = head_bytes(2_000_000, 512, 8, "replicate", grad_elem=2)  # head.grad_dtype=bfloat16
    assert bf16_grad["grad"] * 2 == rep["grad"] and bf16_grad["total"] == 2.5 * rep["weight"]
    assert step_traffic(2_000_000, 512, 128, 8, "replicate") == int(2 * 7 / 8 * 2_000_000 * 512 * 4)
    sh = step_traffic(2_000_000, 512, 128, 8, "shard")
    assert sh == step_traffic(10_000_000, 512, 128, 8, "shard"), "independent of C"
    assert 2 * 7 * 128 * 512 * 4 < sh < 2.1 * 7 * 128 * 512 * 4
    assert step_traffic(100, 8, 4, 1, "shard") == 0
