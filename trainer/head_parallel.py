"""How the trainer runs the margin head on several processes: `head.parallel`.

- replicate: every rank holds the whole `heads.MarginHead`; it sits in DDP with the backbone,
  which all-reduces its C x D gradient every step.
- shard (the default when world size > 1): `heads.sharded.ShardedMarginHead`, C / world classes per
  rank, outside DDP (its gradient is never all-reduced); only the backbone is in DDP.

This module holds what differs between the two, so the training loop stays one loop: building the
head, the embedding-gradient scale that DDP's averaging needs, the global gradient norm, the sparse
optimizer step of Partial FC, the world-size independent head checkpoint (per-class weights and
optimizer state, for both modes) and the start-up line of memory and traffic figures.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from common.cli import UserError
from heads import MarginHead
from heads.core import gradient_dtype
from heads.sharded import (
    ShardedMarginHead,
    gather_class_state,
    head_bytes,
    load_class_state,
    sampled_rows,
    step_traffic,
)


def resolve_parallel(parallel: str, world: int) -> str:
    """ "replicate" or "shard"; "auto" shards when there is more than one process."""
    if parallel == "auto":
        return "shard" if world > 1 else "replicate"
    return parallel


def build_head(
    parallel: str, num_classes: int, embed_dim: int, kwargs: dict[str, Any], sample_rate: float, seed: int
) -> nn.Module:
    """The head for `parallel`; its initial centres depend on `seed` alone (heads.margin_head.init_centres),
    so replicated, sharded on any number of ranks or on one process, a run starts from the same head."""
    if parallel == "replicate":
        if sample_rate < 1.0:
            raise UserError(
                f"head.sample_rate={sample_rate}: Partial FC needs head.parallel=shard "
                "(it samples each rank's own classes)"
            )
        build = MarginHead
    elif kwargs.get("impl") == "reference":
        raise UserError(
            "head.impl=reference holds the B x C logits: use chunked, fused or auto with "
            "head.parallel=shard, or head.parallel=replicate"
        )
    else:
        build = partial(ShardedMarginHead, sample_rate=sample_rate)
    try:
        return build(num_classes, embed_dim, seed=seed, **kwargs)
    except ValueError as err:
        raise UserError(f"head.parallel={parallel}: {err}") from None


def keep_gradient_in(head: nn.Module, grad_dtype: str, parallel: str, world: int) -> None:
    """head.grad_dtype: the dtype autograd keeps the head weight's gradient in (torch's `grad_dtype`
    on the leaf parameter, a sharded head's own rows; the engines write dW in it, and FusedHeadSGD
    steps the fp32 weight and momentum with it). A head replicated over several processes keeps
    float32: DDP's all-reduce buckets hold the parameter's dtype and refuse another gradient's."""
    if grad_dtype == "float32":
        return
    if parallel == "replicate" and world > 1:
        raise UserError(
            f"head.grad_dtype={grad_dtype} with head.parallel=replicate on {world} processes: DDP "
            "all-reduces the head's gradient in the weight's float32; use head.parallel=shard (or auto)"
        )
    head.weight.grad_dtype = getattr(torch, grad_dtype)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return g * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """Identity forward; the gradient times `scale`. The sharded head's loss is the global batch's
    mean, so each rank's embeddings get their exact share of its gradient; DDP then averages the
    backbone's gradients over the ranks, which would divide that by the world size: x world undoes it."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


def clip_grad_norm(
    backbone: list[Tensor],
    head: list[Tensor],
    max_norm: float,
    sharded: bool,
    optimizer: torch.optim.Optimizer | None = None,
) -> Tensor:
    """The gradients' norm over backbone + head (a sharded head's squared norms summed over the
    ranks, so every rank clips by the same factor), and the clip to `max_norm` as torch's
    clip_grad_norm_ makes it: each gradient times min(1, max_norm / (norm + 1e-6)). Not at all with
    clipping off (max_norm inf: torch would multiply every gradient by 1, a read and write of the
    C x D head gradient); a parameter whose multiply `optimizer.defer_grad_scale` takes (the fused
    head step: no pass over the gradient) is left to the step."""
    if not sharded:
        total = grad_norm([p.grad for p in backbone + head if p.grad is not None])
    else:
        squares = []
        for params in (backbone, head):
            grads = [p.grad for p in params if p.grad is not None]
            norm = grad_norm(grads) if grads else torch.zeros((), device=head[0].device)
            squares.append(norm.float() ** 2)
        sq_b, sq_h = squares
        if dist.is_initialized():
            dist.all_reduce(sq_h)  # the head's rows are split over the ranks; the backbone's are copies
        total = torch.sqrt(sq_b + sq_h)
    if math.isfinite(max_norm):
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's factor, as it computes it
        defer = getattr(optimizer, "defer_grad_scale", None)
        rest = [
            p for p in backbone + head if p.grad is not None and not (defer and defer(p, scale.to(p.device)))
        ]
        torch.nn.utils.clip_grads_with_norm_(rest, max_norm, total)
    return total


def grad_norm(grads: list[Tensor]) -> Tensor:
    """torch.nn.utils.get_total_norm of `grads`, but a 16-bit gradient's (head.grad_dtype=bfloat16)
    summed and returned in fp32, without an fp32 copy of it: torch's would be a bf16 norm, three
    significant digits. With fp32 gradients alone it is torch's, bit for bit."""
    narrow = [g for g in grads if g.itemsize < 4]
    if not narrow:
        return torch.nn.utils.get_total_norm(grads)
    wide = [g for g in grads if g.itemsize >= 4]
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in narrow]
    if wide:
        norms.append(torch.nn.utils.get_total_norm(wide))
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def optimizer_step(optimizer: torch.optim.Optimizer, head: nn.Module, step_fn) -> None:
    """`step_fn()` (the scaler's step) with Partial FC's sparse update of the head's sampled rows."""
    with sampled_rows(optimizer, head.weight, getattr(head, "sampled", None)):
        step_fn()


def _num_rows(head: nn.Module) -> int:
    """The whole head's rows: classes x sub-centers (a shard holds whole classes of them)."""
    return int(head.num_classes) * int(head.subcenters)


def head_checkpoint(head: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The head as per-class tensors (weights and optimizer state) on rank 0, None elsewhere. Every
    rank calls it (a sharded head gathers)."""
    sharded = isinstance(head, ShardedMarginHead)
    full = gather_class_state(
        head.weight, optimizer, _num_rows(head), replicated=not sharded, subcenters=head.subcenters
    )
    if full is None or (not sharded and dist.is_initialized() and dist.get_rank() != 0):
        return None
    # the margin's running state (AdaFace's norm statistics, CurricularFace's t): the same on every rank
    return {**full, "buffers": {k: v.detach().cpu().clone() for k, v in head.named_buffers()}}


def optimizer_checkpoint(optimizer: torch.optim.Optimizer, head: nn.Module) -> dict:
    """optimizer.state_dict() without the head weight's entry (that one goes per class, above)."""
    state = optimizer.state_dict()
    ids = [
        i
        for g, sg in zip(optimizer.param_groups, state["param_groups"])
        for p, i in zip(g["params"], sg["params"])
        if p is head.weight
    ]
    state["state"] = {k: v for k, v in state["state"].items() if k not in ids}
    return state


def load_head(head: nn.Module, optimizer: torch.optim.Optimizer, saved: dict, where: str) -> None:
    """This rank's rows of a head checkpoint into the head and its optimizer state."""
    sharded = isinstance(head, ShardedMarginHead)
    rank, world = (head.rank, head.world) if sharded else (0, 1)
    try:
        load_class_state(head.weight, optimizer, saved, _num_rows(head), rank, world, head.subcenters)
    except ValueError as err:
        raise UserError(f"{where}: cannot resume: {err}") from None
    buffers = saved.get("buffers", {})
    missing = [k for k, _ in head.named_buffers() if k not in buffers]
    if missing:
        raise UserError(
            f"{where}: cannot resume: the checkpoint has no {', '.join(missing)} (the margin's "
            "running state; saved with another margin)"
        )
    with torch.no_grad():
        for k, v in head.named_buffers():
            v.copy_(buffers[k])


def describe(
    head: nn.Module,
    parallel: str,
    optimizer: torch.optim.Optimizer,
    batch_per_rank: int,
    world: int,
    backend: str | None,
) -> str:
    """One line: the head's bytes per rank (weight, gradient, optimizer state) and its traffic per step."""
    C, D = _num_rows(head), int(head.weight.shape[1])
    group = optimizer.param_groups[0]
    slots = 2 if "betas" in group else (1 if group.get("momentum", 0.0) else 0)
    rate = getattr(head, "sample_rate", 1.0)
    elem, grad_elem = head.weight.element_size(), gradient_dtype(head.weight).itemsize
    b = head_bytes(C, D, world, parallel, slots, rate, elem=elem, grad_elem=grad_elem)
    sent = step_traffic(C, D, batch_per_rank, world, parallel, backend or "nccl")
    extra = f", sampled copies {_size(b['sampled_copies'])}" if "sampled_copies" in b else ""
    how = "all-reduce of its gradient" if parallel == "replicate" else "embedding gather + dX reduce"
    K = int(head.subcenters)
    here = (C if parallel == "replicate" else head.weight.shape[0]) // K
    each = f" ({K} sub-centers each)" if K > 1 else ""
    return (
        f"head: {parallel}, {here} of {C // K} classes{each} on this rank; "
        f"per rank weight {_size(b['weight'])}, gradient {_size(b['grad'])}, "
        f"optimizer state {_size(b['optimizer'])}{extra}; "
        f"sends {_size(sent)} per step ({how})" + (f", sample rate {rate}" if rate < 1.0 else "")
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class HeadState:
    """The checkpoint's "head_state": the head per class (weights and optimizer state), so a run saved
    on N ranks, sharded or replicated, resumes on M. `gather()` on every rank before rank 0 saves."""

    def __init__(self, head: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.head, self.optimizer = head, optimizer
        self.gathered: dict | None = None

    def gather(self) -> None:
        self.gathered = head_checkpoint(self.head, self.optimizer)

    def state_dict(self) -> dict:
        if self.gathered is None:
            raise RuntimeError("HeadState.gather() was not called on every rank before saving")
        return self.gathered

    def load_state_dict(self, state: dict) -> None:
        load_head(self.head, self.optimizer, state, "checkpoint")


class OptimizerState:
    """The checkpoint's "optimizer": everything but the head weight's state (that is in HeadState).
    Load it before the head: optimizer.load_state_dict replaces the whole state."""

    def __init__(self, optimizer: torch.optim.Optimizer, head: nn.Module) -> None:
        self.optimizer, self.head = optimizer, head

    def state_dict(self) -> dict:
        return optimizer_checkpoint(self.optimizer, self.head)

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
