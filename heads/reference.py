"""The readable definition: plain PyTorch, materializes the B x C logits, autograd for gradients.

Other implementations are tested against this one (run in float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.margins import Margin


def modified_logits(
    cos: Tensor, labels: Tensor, psi: Tensor, s: float, t: float, hard_t: Tensor | None = None
) -> Tensor:
    """s * psi at the target; at hard negatives (c > psi): s * (t c + t - 1) when t > 1 (SV-Softmax),
    s * c (hard_t + c) with CurricularFace's hard_t; s * c elsewhere."""
    target = F.one_hot(labels, cos.shape[1]).bool()
    logits = s * cos
    hard = (cos > psi.detach()[:, None]) & ~target
    if hard_t is not None:
        logits = torch.where(hard, s * cos * (hard_t.detach().to(cos.dtype) + cos), logits)
    elif t != 1.0:
        logits = torch.where(hard, s * (t * cos + t - 1.0), logits)
    return torch.where(target, s * psi[:, None], logits)


def focal(row_loss: Tensor, gamma: float) -> Tensor:
    """face.evoLVe's focal term on the per-row loss: (1 - p)^gamma * loss with p = exp(-loss)."""
    if gamma == 0.0:
        return row_loss
    return (1.0 - torch.exp(-row_loss)) ** gamma * row_loss


def reference_forward(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: Margin,
    s: float,
    t: float,
    gamma: float = 0.0,
    step: int = 0,
    state: dict[str, Tensor] | None = None,
    training: bool = False,
    subcenters: int = 1,
) -> tuple[Tensor, Tensor]:
    """(mean loss, accuracy) where accuracy is the fraction of rows whose target cosine is the max.
    `state`: the margin's running state (moved in place when `training`). `subcenters` K: weight holds
    K rows per class, a class's cosine is the max of its rows' (the gradient goes to that row)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    xn = F.normalize(x, dim=1)
    wn = F.normalize(weight.to(dtype), dim=1)
    cos = xn @ wn.t()
    if subcenters > 1:
        cos = cos.view(cos.shape[0], -1, subcenters).max(2).values
    c_y = cos.gather(1, labels[:, None])[:, 0]
    state = {} if state is None else state
    norms = torch.linalg.vector_norm(x, dim=1)
    psi = margin.psi(c_y, step, margin.rows(c_y, norms, state, training))
    logits = modified_logits(cos, labels, psi, s, t, margin.hard_t(state))
    row = F.cross_entropy(logits, labels, reduction="none")
    with torch.no_grad():
        acc = (cos.argmax(1) == labels).to(dtype).mean()
    return with_regularizer(focal(row, gamma).mean(), margin, norms), acc


def with_regularizer(loss: Tensor, margin: Margin, norms: Tensor) -> Tensor:
    """The mean loss plus the margin's term on the norms (MagFace), if it has one."""
    reg = margin.regularizer(norms)
    return loss if reg is None else loss + reg
