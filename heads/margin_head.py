"""The single-process margin head (`MarginHead`), what the sharded head shares with it (`HeadBase`),
and the seeded initial class centres both start from (`init_centres`). The API is in heads/__init__.py."""

from __future__ import annotations

import math
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.core import Engine, head_rows
from heads.margins import Margin
from heads.options import HeadOptions
from heads.reference import focal, reference_forward, with_regularizer

INIT_BLOCK = 1 << 16  # classes per seeded block of the initial centres (any world size draws the same)


def init_centres(num_classes: int, embed_dim: int, start: int, end: int, seed: int = 0) -> Tensor:
    """Rows [start, end) of the N(0, 0.01^2) initial centres: a function of (seed, class) only.

    Each block of INIT_BLOCK classes has its own seeded generator, so a process draws just the blocks
    that overlap its rows (O(end - start) work) and any split of the classes over ranks gives the
    rows a single process would hold."""
    out = torch.empty(end - start, embed_dim)
    for b in range(start // INIT_BLOCK, math.ceil(end / INIT_BLOCK)):
        b0, b1 = b * INIT_BLOCK, min(num_classes, (b + 1) * INIT_BLOCK)
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        block = torch.randn(b1 - b0, embed_dim, generator=g) * 0.01
        lo, hi = max(b0, start), min(b1, end)
        out[lo - start : hi - start] = block[lo - b0 : hi - b0]
    return out


class HeadBase(nn.Module):
    """A head's options (validated once by HeadOptions), its margin, training step, engines and
    last accuracy; `weight` holds classes [class_start, class_end) of num_classes, drawn from `seed`."""

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        options: HeadOptions,
        seed: int,
        class_start: int,
        class_end: int,
    ) -> None:
        super().__init__()
        self.options = options
        self.margin: Margin = options.build_margin()
        self.s, self.t, self.gamma_focal = options.scale, float(options.t), float(options.gamma_focal)
        self.impl, self.block = options.impl, options.block
        self.num_classes, self.seed = int(num_classes), int(seed)
        self.class_start, self.class_end = class_start, class_end
        # K sub-centers per class: class j's rows j K .. j K + K - 1, drawn as rows of a C K-class head
        K = self.subcenters = int(options.subcenters)
        self.weight = nn.Parameter(
            init_centres(num_classes * K, embed_dim, class_start * K, class_end * K, seed)
        )
        # the margin's running state (float64 scalars): in state_dict and the trainer's checkpoints;
        # computed from the global batch, so it is the same on every rank
        for name, value in self.margin.state.items():
            self.register_buffer(f"margin_{name}", torch.tensor(value, dtype=torch.float64))
        self.step = 0
        self.last_accuracy: Tensor | None = None
        self._engines: dict[str, Engine] = {}  # built once per implementation, on first use

    def set_step(self, step: int) -> None:
        """The training step, for margins that anneal with it (SphereFace)."""
        self.step = int(step)

    def resolved_impl(self, device: torch.device) -> str:
        return self.options.resolved_impl(device, self.weight.shape[1])

    def engine(self, impl: str) -> Engine:
        """The chunked or fused engine, made on first use and kept (the fused one records its kernels)."""
        if impl not in self._engines:
            self._engines[impl] = self.options.make_engine(impl)
        return self._engines[impl]

    def margin_state(self) -> dict[str, Tensor]:
        """The margin's running state: the buffers themselves (the margin moves them in place)."""
        return {name: getattr(self, f"margin_{name}") for name in self.margin.state}

    def _finish(self, loss: Tensor, acc: Tensor, return_accuracy: bool):
        self.last_accuracy = acc.detach()
        return (loss, self.last_accuracy) if return_accuracy else loss

    def one_row_options(self) -> dict:
        """This head's options as constructor keywords (margin's own included), with one row a class."""
        own = {f.name: getattr(self.options, f.name) for f in fields(self.options)}
        del own["margin"], own["margin_options"]
        return {**own, **self.options.margin_options, "subcenters": 1}

    @torch.no_grad()
    def dominant_rows(self, xn: Tensor, labels: Tensor) -> Tensor:
        """Sub-center ArcFace's cleaning step for this head's classes: per class the row of `weight`
        most of its embeddings (`xn`, normalized; `labels`, global class ids) are nearest to, the
        first of its K when none is given; (classes here) x D. Labels of other classes vote into a
        spare slot (no boolean indexing, so no host sync)."""
        K, (rows, D) = self.subcenters, self.weight.shape
        C = rows // K
        local = labels.long().to(self.weight.device) - self.class_start
        here = (local >= 0) & (local < C)
        local = local.clamp(0, C - 1)
        wn = F.normalize(self.weight.float(), dim=1).view(C, K, D)
        nearest = torch.einsum("bd,bkd->bk", xn.float(), wn[local]).argmax(1)
        slot = torch.where(here, local * K + nearest, C * K)
        votes = torch.bincount(slot, minlength=C * K + 1)[: C * K].view(C, K)
        return self.weight.view(C, K, D)[torch.arange(C, device=self.weight.device), votes.argmax(1)]

    @torch.no_grad()
    def with_rows(self, single: HeadBase, weight: Tensor) -> HeadBase:
        """`single` (a one-row head of the same classes) holding `weight` and this head's margin state."""
        single.weight.copy_(weight)
        for name, value in self.named_buffers():
            getattr(single, name).copy_(value)
        return single.to(self.weight.device)


class MarginHead(HeadBase):
    """The whole head on one process (the API is in heads/__init__.py's docstring)."""

    def __init__(
        self, num_classes: int, embed_dim: int, margin: str = "cosface", *, seed: int = 0, **options
    ) -> None:
        super().__init__(
            num_classes, embed_dim, HeadOptions.from_kwargs(margin=margin, **options), seed, 0, num_classes
        )

    @torch.compiler.disable
    def forward(self, embeddings: Tensor, labels: Tensor, return_accuracy: bool = False):
        # the head computes in fp32 even inside the trainer's bf16/fp16 autocast region
        with torch.autocast(embeddings.device.type, enabled=False):
            loss, acc = self._loss(embeddings, labels.long())
        return self._finish(loss, acc, return_accuracy)

    def _loss(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        impl = self.resolved_impl(embeddings.device)
        if impl == "reference":
            return reference_forward(
                embeddings,
                self.weight,
                labels,
                self.margin,
                self.s,
                self.t,
                self.gamma_focal,
                self.step,
                self.margin_state(),
                self.training,
                self.subcenters,
            )
        dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        x = embeddings.to(dtype)
        norms = torch.linalg.vector_norm(x, dim=1)
        rows, correct = head_rows(
            F.normalize(x, dim=1),
            self.weight,
            labels,
            self.margin,
            self.step,
            self.s,
            self.t,
            self.engine(impl),
            norms,
            self.margin_state(),
            self.training,
        )
        return with_regularizer(focal(rows, self.gamma_focal).mean(), self.margin, norms), correct.mean()

    @torch.no_grad()
    def dominant_subcenters(self, embeddings: Tensor, labels: Tensor) -> MarginHead:
        """Sub-center ArcFace's cleaning step: a one-row-per-class head (same options and state) whose
        class j keeps the sub-center most of j's given embeddings are closest to (the first of j's rows
        when none is given). Pass the training set's embeddings, in batches' concatenation."""
        xn = F.normalize(embeddings.float().to(self.weight.device), dim=1)
        single = MarginHead(
            self.num_classes, self.weight.shape[1], self.margin.name, seed=self.seed, **self.one_row_options()
        )
        return self.with_rows(single, self.dominant_rows(xn, labels))

    def extra_repr(self) -> str:
        C, D = self.weight.shape
        return (
            f"classes={C // self.subcenters}, dim={D}, margin={self.margin.name}, s={self.s}, "
            f"t={self.t}, impl={self.impl}, focal={self.gamma_focal}, subcenters={self.subcenters}"
        )
