"""A class-sharded margin head (model parallel), with Partial FC sampling of the negative classes.

Rank r of a world of W holds the centres of a contiguous class range (`class_range`; the first
C % W ranks hold one class more), initialized as those rows of a MarginHead with the same seed
(`heads.margin_head.init_centres`), so a run starts alike on any number of ranks. Options are
MarginHead's, checked by the same `heads.options.HeadOptions`, with the same engine factory.

One forward pass:

1. each rank normalizes its embeddings and all-gathers them and the labels: the global batch, N
   rows in rank order. The gather's backward sums the ranks' partial dX and hands each rank the
   gradient of its own rows.
2. the owner of each label computes the target cosine c_y; an all-reduce gives every rank all N,
   so every rank has psi(c_y) (SV-Softmax's hard-negative test compares every cosine with it).
3. each rank runs the engine (chunked, or fused on CUDA) over its own classes: the log-sum-exp of
   its non-target logits and its best non-target cosine, without a N x C tensor.
4. the global log-sum-exp is M + log(sum_r exp(lse_r - M) + exp(s psi - M)) with M the all-reduced
   max: every term is at most 1, so it cannot overflow.
5. backward: the engine sweeps the local classes again (global lse; the target column on the owner
   only) for this rank's dW and its partial dX.

Traffic per step is O(W B D) (`step_traffic`), whatever C is; the head is not wrapped in DDP.

Sub-centers (`subcenters=K`): a rank owns whole classes, all K rows of each (its `weight` holds rows
class_start K .. class_end K - 1); the owner computes c_y as the max over the class's K rows and
routes dc_y to that row. `dominant_subcenters` is a collective returning the one-row sharded head.

Partial FC (`sample_rate` < 1): each forward keeps, per rank, the centres (all K rows of a class)
of every label of the global batch that the rank owns plus uniformly drawn other classes,
`sample_size` classes in all:
int(sample_rate x C_local), raised to the global batch's row count N where that is larger (so every
positive fits) -- a size fixed by shapes, so sampling needs no host sync (seeded by seed, rank and
step: deterministic). `sampled_rows` makes the optimizer step touch only those rows: their
momentum / Adam moments are gathered, stepped and written back; the other rows' weights and state
stay exactly as they were (a centre's momentum does not decay while it is not sampled, and weight
decay skips it too: Partial FC's sparse update). `select_rows` takes the drawn rows: its backward
writes the weight's gradient in `gradient_dtype` (bf16 with a bf16 grad_dtype, no fp32 C x D).
Adam's scalar step count is shared by all rows.

Per-class state for checkpoints (`gather_class_state`, `slice_class_state`, `load_class_state`):
the weight and every row-shaped optimizer state tensor as full C K-row tensors (K rows a class,
whole classes per rank), so a run saved on N ranks resumes on M.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from heads.core import (
    Engine,
    backward_through_engine,
    engine_inv_norms,
    gradient_dtype,
    subcenter_rows,
    target_cosines,
    target_terms,
)
from heads.margin_head import HeadBase
from heads.margins import Margin
from heads.options import HeadOptions
from heads.reference import focal

__all__ = [
    "ShardedMarginHead",
    "class_range",
    "sample_classes",
    "sampled_rows",
    "select_rows",
    "gather_class_state",
    "slice_class_state",
    "load_class_state",
    "head_bytes",
    "step_traffic",
]

SUM, MAX = dist.ReduceOp.SUM, dist.ReduceOp.MAX


def _world(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _all_reduce(t: Tensor, op, group) -> Tensor:
    if _world(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def class_range(num_classes: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the classes rank `rank` owns; the first num_classes % world ranks get one more."""
    base, extra = divmod(num_classes, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def row_range(num_rows: int, subcenters: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the weight rows rank `rank` owns when `num_rows` = classes x K sub-centers:
    the K rows of each of its classes (`class_range`), so a class is never split over ranks."""
    start, end = class_range(num_rows // subcenters, rank, world)
    return start * subcenters, end * subcenters


class _GatherRows(torch.autograd.Function):
    """all_gather of equal-sized row blocks; backward sums the ranks' gradients, returns our rows."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(_world(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        world, rank = _world(ctx.group), _rank(ctx.group)
        n = g.shape[0] // world
        g = g.contiguous().clone()
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty((n, *g.shape[1:]), dtype=g.dtype, device=g.device)
            dist.reduce_scatter_tensor(out, g, group=ctx.group)
            return out, None
        dist.all_reduce(g, group=ctx.group)  # gloo has no reduce-scatter
        return g[rank * n : (rank + 1) * n], None


def gather_rows(x: Tensor, group=None) -> Tensor:
    """The global batch (rows of every rank, in rank order), differentiable; x itself on one rank."""
    return _GatherRows.apply(x, group) if _world(group) > 1 else x


def gather_labels(labels: Tensor, group=None) -> Tensor:
    if _world(group) == 1:
        return labels
    parts = [torch.empty_like(labels) for _ in range(_world(group))]
    dist.all_gather(parts, labels.contiguous(), group=group)
    return torch.cat(parts)


class _SelectRows(torch.autograd.Function):
    """weight[index] whose backward builds the weight's gradient in gradient_dtype(weight)."""

    @staticmethod
    def forward(ctx, weight: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.shape, ctx.grad_dtype = weight.shape, gradient_dtype(weight)
        return weight[index]

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (index,) = ctx.saved_tensors
        dw = g.new_zeros(ctx.shape, dtype=ctx.grad_dtype)
        # torch's own index backward: duplicate rows add up in a fixed order (no atomics), and
        # unsafe=True skips the range check, a host sync on CUDA (forward already checked it)
        torch.ops.aten._index_put_impl_(dw, [index], g.to(ctx.grad_dtype), True, True)
        return dw, None


def select_rows(weight: Tensor, index: Tensor) -> Tensor:
    """weight[index], differentiable, with the weight's gradient built directly in
    `gradient_dtype(weight)`: with a bf16 grad_dtype no fp32 tensor of the weight's shape exists
    (torch's index backward fills an fp32 one, 2 GB at 1M x 512, that autograd then casts). Values
    and, with an fp32 gradient, the gradient are bitwise torch's. Repeated rows add up in the
    gradient's dtype (Partial FC's draw has none: topk's distinct classes)."""
    return _SelectRows.apply(weight, index)


def _global_lse(lse_r: Tensor, tgt: Tensor, max_r: Tensor, group) -> tuple[Tensor, Tensor]:
    """(log-sum-exp over every rank's non-target logits and the target, global best non-target cosine)."""
    top = torch.stack([torch.maximum(lse_r, tgt), max_r.to(lse_r.dtype)])
    _all_reduce(top, MAX, group)  # one collective for both maxima
    m = top[0]
    total = _all_reduce(torch.exp(lse_r - m), SUM, group)
    return m + torch.log(total + torch.exp(tgt - m)), top[1]


class _ShardedFn(torch.autograd.Function):
    """Per-row loss over the global batch; `labels` are local class ids, -1 where another rank owns them."""

    @staticmethod
    def forward(
        ctx,
        xn: Tensor,
        weight: Tensor,
        labels: Tensor,
        norms: Tensor | None,
        margin: Margin,
        step: int,
        s: float,
        t: float,
        engine: Engine,
        state: dict[str, Tensor],
        training: bool,
        group,
    ) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        rw = engine_inv_norms(engine, weight)
        own = labels >= 0
        c_own, rows = target_cosines(xn, weight, rw, labels.clamp_min(0), engine.subcenters)
        rows = torch.where(own, rows, -1)  # the row of weight each c_y came from, on its owner
        c_y = _all_reduce(torch.where(own, c_own, torch.zeros_like(c_own)), SUM, group)
        # every rank has the global batch's c_y and norms: the running state moves alike everywhere
        p, psi, t = target_terms(margin, c_y, norms, state, training, step, t)
        lse_r, max_r = engine.forward(xn, weight, rw, labels, psi, s, t)
        tgt = s * psi
        lse, max_other = _global_lse(lse_r.to(xn.dtype), tgt, max_r, group)
        ctx.save_for_backward(xn, weight, labels, rw, c_y, psi, lse, p, rows)
        ctx.margin, ctx.step, ctx.s, ctx.t, ctx.engine = margin, step, s, t, engine
        correct = (c_y >= max_other).to(xn.dtype)
        ctx.mark_non_differentiable(correct)
        return lse - tgt, correct

    @staticmethod
    def backward(ctx, g: Tensor, _g_correct: Tensor):  # type: ignore[override]
        dxn, dw, dnorms = backward_through_engine(ctx, g)
        return (dxn, dw, None, dnorms, *([None] * 8))


def sample_size(num_local: int, rate: float, rows: int) -> int:
    """Classes a rank keeps per draw: int(rate x num_local), or more if the global batch's `rows`
    labels could all be distinct classes of this rank (every positive must fit); at most num_local.
    It depends on shapes only, so the draw has a fixed size and needs no host sync."""
    return min(num_local, max(1, int(rate * num_local), rows))


def sample_classes(
    local_labels: Tensor, num_local: int, rate: float, generator: torch.Generator
) -> Tensor | None:
    """Sorted local ids: every label in [0, num_local) (the positives; others, such as -1 for classes
    another rank owns, are ignored) plus uniformly drawn other classes, `sample_size` in all. None:
    all classes. No host sync: the positives are marked in a fixed-size score vector, not gathered."""
    if rate >= 1.0:
        return None
    keep = sample_size(num_local, rate, local_labels.numel())
    score = torch.rand(num_local + 1, generator=generator, device=generator.device)
    inside = (local_labels >= 0) & (local_labels < num_local)
    # positives score 2, above every uniform draw, so they always win; the rest go to a spare slot
    score.index_fill_(0, torch.where(inside, local_labels, num_local), 2.0)
    return torch.topk(score[:num_local], keep).indices.sort().values


class ShardedMarginHead(HeadBase):
    """MarginHead's function over classes sharded across the process group (see the module doc).

    `weight` holds this rank's classes [class_start, class_end), the rows of a MarginHead with the
    same seed. `forward(embeddings, labels)` takes this rank's rows and returns the mean loss over
    the global batch (the same on every rank); the embeddings' gradient is that of the global mean
    loss for this rank's rows. Every rank must pass the same number of rows. Without a process group
    it is the whole head on one process. Options as MarginHead's (heads.options.HeadOptions), but
    not impl="reference" (it holds the B x C logits). With sampling, call `set_step` every step (the
    trainer does): `sampled` collects the draws of every forward until the next step begins (rows
    of `weight`: the K rows of each drawn class).
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        margin: str = "cosface",
        *,
        sample_rate: float = 1.0,
        seed: int = 0,
        group=None,
        **options,
    ) -> None:
        opts = HeadOptions.from_kwargs(margin=margin, **options)
        if opts.impl == "reference":
            raise ValueError("sharded head impl 'reference': expected auto, chunked or fused")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        rank, world = _rank(group), _world(group)
        if num_classes < world:
            raise ValueError(f"{num_classes} classes cannot be sharded over {world} ranks (one each)")
        super().__init__(num_classes, embed_dim, opts, seed, *class_range(num_classes, rank, world))
        self.sample_rate, self.group, self.rank, self.world = float(sample_rate), group, rank, world
        self._draws = 0
        # rows of weight this step's forwards used (None: all); sampled_rows steps only these
        self.sampled: Tensor | None = None

    @property
    def num_local(self) -> int:
        return self.class_end - self.class_start

    def set_step(self, step: int) -> None:
        """The training step: SphereFace's annealing and the seed of the class sample."""
        super().set_step(step)
        self._draws = 0

    def forward(self, embeddings: Tensor, labels: Tensor, return_accuracy: bool = False):
        with torch.autocast(embeddings.device.type, enabled=False):
            dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
            x = embeddings.to(dtype)
            xn = gather_rows(F.normalize(x, dim=1), self.group)
            norms_here = torch.linalg.vector_norm(x, dim=1)
            # the global batch's norms, for margins that use them (its gradient: the owner's rank's)
            norms = gather_rows(norms_here[:, None], self.group)[:, 0] if self.margin.uses_norms else None
            local = gather_labels(labels.long(), self.group) - self.class_start
            owned = (local >= 0) & (local < self.num_local)
            index = None
            weight = self.weight
            if self.sample_rate < 1.0:
                drawn = sample_classes(local, self.num_local, self.sample_rate, self._generator(xn.device))
                index = subcenter_rows(drawn, self.subcenters).flatten()  # their K rows each
                weight = select_rows(self.weight, index)
                local = torch.searchsorted(drawn, local.clamp(0, self.num_local - 1))
            local = torch.where(owned, local, torch.full_like(local, -1))
            rows, correct = _ShardedFn.apply(
                xn,
                weight,
                local,
                norms,
                self.margin,
                self.step,
                self.s,
                self.t,
                self.engine(self.resolved_impl(xn.device)),
                self.margin_state(),
                self.training,
                self.group,
            )
            loss = self._regularized(focal(rows, self.gamma_focal).mean(), norms, norms_here)
        if index is not None and self.sampled is not None and self._draws > 1:
            # accumulation: every row touched this step. A class drawn twice is listed twice (no
            # unique(), a host sync): both copies step alike, so they write back the same row.
            index = torch.cat([self.sampled, index])
        self.sampled = index
        return self._finish(loss, correct.mean(), return_accuracy)

    def _regularized(self, loss: Tensor, norms: Tensor | None, norms_here: Tensor) -> Tensor:
        """The loss plus MagFace's term (a mean over the global batch): its value from every rank's
        norms, its gradient from this rank's rows only (so the ranks' dX sum to it once)."""
        total = None if norms is None else self.margin.regularizer(norms.detach())
        if total is None:
            return loss
        here = self.margin.regularizer(norms_here) * (norms_here.shape[0] / norms.shape[0])
        return loss + here + (total - here).detach()

    def _generator(self, device: torch.device) -> torch.Generator:
        # a fresh stream per (seed, rank, step, draw within the step): reproducible and resumable
        self._draws += 1
        key = ((self.seed * 1_000_003 + self.rank) * 1_000_033 + self.step) * 64 + self._draws
        return torch.Generator(device=device).manual_seed(key % (1 << 63))

    @torch.no_grad()
    def dominant_subcenters(self, embeddings: Tensor, labels: Tensor) -> ShardedMarginHead:
        """MarginHead.dominant_subcenters, sharded: a collective (every rank calls it with its own
        embeddings and labels, the same number of rows on each, as in forward), gathered so each rank
        votes for its own classes; returns the one-row sharded head of the same classes, group,
        sample rate, options and margin state."""
        xn = gather_rows(F.normalize(embeddings.float().to(self.weight.device), dim=1), self.group)
        labels = gather_labels(labels.long().to(self.weight.device), self.group)
        single = ShardedMarginHead(
            self.num_classes,
            self.weight.shape[1],
            self.margin.name,
            sample_rate=self.sample_rate,
            seed=self.seed,
            group=self.group,
            **self.one_row_options(),
        )
        return self.with_rows(single, self.dominant_rows(xn, labels))

    def extra_repr(self) -> str:
        return (
            f"classes={self.num_classes} [{self.class_start}, {self.class_end}) of rank {self.rank}/"
            f"{self.world}, dim={self.weight.shape[1]}, margin={self.margin.name}, s={self.s}, "
            f"t={self.t}, focal={self.gamma_focal}, sample_rate={self.sample_rate}, "
            f"subcenters={self.subcenters}"
        )


def _row_state(state: dict, weight: Tensor) -> dict[str, Tensor]:
    """The optimizer state tensors with one row per class (momentum, Adam's moments)."""
    return {k: v for k, v in state.items() if isinstance(v, Tensor) and v.shape == weight.shape}


@contextmanager
def sampled_rows(optimizer: torch.optim.Optimizer, weight: Tensor, index: Tensor | None) -> Iterator[None]:
    """Inside the block `optimizer` steps only rows `index` of `weight` (and those rows of its state).

    The rows and their gradient are copied into a stand-in parameter with that state, the optimizer
    steps it in the weight's place, and the results are written back; every other row (weight and
    state) is left exactly as it was. `index` None: the plain step.
    """
    if index is None:
        yield
        return
    group = next(g for g in optimizer.param_groups if any(p is weight for p in g["params"]))
    pos = next(i for i, p in enumerate(group["params"]) if p is weight)
    sub = nn.Parameter(weight.detach()[index])
    # in the weight's dtype: a bf16 gradient (head.grad_dtype) would give torch's SGD a bf16 momentum
    sub.grad = None if weight.grad is None else weight.grad[index].to(sub.dtype)
    full = optimizer.state.pop(weight, {})
    rows = _row_state(full, weight)
    optimizer.state[sub] = {k: (v[index] if k in rows else v) for k, v in full.items()}
    group["params"][pos] = sub
    try:
        yield
    finally:
        group["params"][pos] = weight
        stepped = optimizer.state.pop(sub, {})
        with torch.no_grad():
            weight[index] = sub.detach()
            for k, v in stepped.items():
                if isinstance(v, Tensor) and v.shape == sub.shape:
                    if k not in full:  # first step: state rows never sampled start at zero
                        full[k] = torch.zeros(weight.shape, dtype=v.dtype, device=v.device)
                    full[k][index] = v
                else:
                    full[k] = v
        if full:
            optimizer.state[weight] = full


def shard_state(weight: Tensor, optimizer: torch.optim.Optimizer | None) -> dict[str, dict[str, Tensor]]:
    """This rank's rows: {"rows": {"weight": ..., "optim.<name>": ...}, "scalars": {<name>: ...}}."""
    state = optimizer.state.get(weight, {}) if optimizer is not None else {}
    rows = {"weight": weight.detach(), **{f"optim.{k}": v for k, v in _row_state(state, weight).items()}}
    scalars = {k: v for k, v in state.items() if k not in _row_state(state, weight)}
    return {"rows": rows, "scalars": scalars}


def gather_class_state(
    weight: Tensor,
    optimizer: torch.optim.Optimizer | None,
    num_classes: int,
    group=None,
    dst: int = 0,
    replicated: bool = False,
    subcenters: int = 1,
) -> dict | None:
    """The whole head as per-class tensors on rank `dst` (None elsewhere): independent of the world size.

    {"num_classes": N, "subcenters": K, "rows": {"weight": N x D, "optim.momentum_buffer": N x D, ...},
    "scalars": {...}} on the CPU, N = `num_classes` the rows of the whole head (classes x K
    sub-centers; each rank holds whole classes, `row_range`). A collective for a sharded head (every
    rank of the group calls it); `replicated`: every rank holds all N rows, nothing is gathered.
    """
    world, rank = (1, 0) if replicated else (_world(group), _rank(group))
    mine = shard_state(weight, optimizer)
    if world == 1:
        return {
            "num_classes": num_classes,
            "subcenters": subcenters,
            "rows": {k: v.cpu().clone() for k, v in mine["rows"].items()},
            "scalars": mine["scalars"],
        }
    keys: list = [None] * world
    dist.all_gather_object(keys, sorted(mine["rows"]), group=group)
    if any(k != keys[0] for k in keys):
        raise RuntimeError(f"ranks disagree on the head's optimizer state: {keys}")
    most = row_range(num_classes, subcenters, 0, world)[1]  # rank 0 holds the most rows
    out: dict[str, Tensor] = {}
    for key in keys[0]:
        t = mine["rows"][key]
        padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)] if rank == dst else None
        dist.gather(padded, parts, dst=dst, group=group)
        if parts is not None:
            sizes = [row_range(num_classes, subcenters, r, world) for r in range(world)]
            out[key] = torch.cat([p[: b - a].cpu() for p, (a, b) in zip(parts, sizes)])
    if rank != dst:
        return None
    return {"num_classes": num_classes, "subcenters": subcenters, "rows": out, "scalars": mine["scalars"]}


def slice_class_state(full: dict, rank: int, world: int) -> dict:
    """The rows rank `rank` of `world` owns (whole classes: all K rows of each), from a
    gather_class_state dict."""
    K = int(full.get("subcenters", 1))
    a, b = row_range(int(full["num_classes"]), K, rank, world)
    return {
        "num_classes": full["num_classes"],
        "subcenters": K,
        "rows": {k: v[a:b] for k, v in full["rows"].items()},
        "scalars": dict(full["scalars"]),
    }


def load_class_state(
    weight: Tensor,
    optimizer: torch.optim.Optimizer | None,
    full: dict,
    num_classes: int,
    rank: int = 0,
    world: int = 1,
    subcenters: int = 1,
) -> None:
    """Put this rank's slice of a per-class state into `weight` and the optimizer's state for it.
    `num_classes`: the head's rows (classes x `subcenters`), as gather_class_state's.

    Raises ValueError (one line) when the class count, the sub-centers or the embedding size differs."""
    saved_c, saved_d = int(full["num_classes"]), int(full["rows"]["weight"].shape[1])
    if (saved_c, saved_d) != (num_classes, weight.shape[1]):
        raise ValueError(
            f"the checkpoint's head has {saved_c} classes x {saved_d} dims, this run's "
            f"{num_classes} x {weight.shape[1]} (another class count or embedding size)"
        )
    saved_k = int(full.get("subcenters", 1))
    if saved_k != subcenters:
        raise ValueError(f"the checkpoint's head has {saved_k} sub-centers a class, this run's {subcenters}")
    part = slice_class_state(full, rank, world)
    saved = part["rows"]["weight"]
    if saved.shape != weight.shape:
        raise ValueError(
            f"rank {rank} of {world} holds {tuple(weight.shape)} head rows, its slice of the "
            f"checkpoint is {tuple(saved.shape)}"
        )
    with torch.no_grad():
        weight.copy_(saved)
    if optimizer is None:
        return
    state = {
        k.removeprefix("optim."): v.to(device=weight.device, copy=True)
        for k, v in part["rows"].items()
        if k.startswith("optim.")
    }
    state.update({k: (v.clone() if isinstance(v, Tensor) else v) for k, v in part["scalars"].items()})
    if state:
        optimizer.state[weight] = state


def head_bytes(
    num_classes: int,
    embed_dim: int,
    world: int,
    parallel: str,
    optimizer_slots: int = 1,
    sample_rate: float = 1.0,
    elem: int = 4,
    grad_elem: int | None = None,
) -> dict[str, int]:
    """Bytes per rank of the head's weight, gradient and optimizer state (the largest rank's shard).

    optimizer_slots: row-shaped state tensors (SGD momentum 1, Adam 2). The gradient is dense in both
    modes, `grad_elem` bytes an element (None: `elem`; 2 with a bf16 `grad_dtype`); with sampling,
    `sampled_copies` is the step's copy of the sampled rows, their gradient and state (forward
    gather and `sampled_rows`, which widens the gradient's rows to the weight's dtype)."""
    rows = num_classes if parallel == "replicate" else class_range(num_classes, 0, world)[1]
    one = rows * embed_dim * elem
    grad = rows * embed_dim * (elem if grad_elem is None else grad_elem)
    out = {"weight": one, "grad": grad, "optimizer": optimizer_slots * one}
    if sample_rate < 1.0:
        out["sampled_copies"] = int(sample_rate * rows) * embed_dim * elem * (2 + optimizer_slots)
    out["total"] = sum(out.values())
    return out


def step_traffic(
    num_classes: int,
    embed_dim: int,
    batch_per_rank: int,
    world: int,
    parallel: str,
    backend: str = "nccl",
    elem: int = 4,
) -> int:
    """Bytes one rank sends per step for the head under ring collectives (the backbone's DDP all-reduce,
    the same in both modes, excluded). replicate: the all-reduce of the C x D gradient; shard: the
    all-gather of the embeddings and labels, three all-reduces of N-vectors (c_y, the maxima, the
    sums) and the reduce-scatter of dX (an all-reduce on gloo, which has no reduce-scatter)."""
    if world == 1:
        return 0
    ring = 2 * (world - 1) / world  # all-reduce: reduce-scatter + all-gather
    if parallel == "replicate":
        return int(ring * num_classes * embed_dim * elem)
    n = batch_per_rank * world
    gather = (world - 1) * batch_per_rank * (embed_dim * elem + 8)
    vectors = ring * 4 * n * elem
    dx = (world - 1) * batch_per_rank * embed_dim * elem * (2 if backend == "gloo" else 1)
    return int(gather + vectors + dx)
