"""The readable definition: plain PyTorch, materializes the B x C logits, autograd for gradients.

Other implementations are tested against this one (run in float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from heads.margins import Margin


def modified_logits(cos: Tensor, labels: Tensor, psi: Tensor, s: float, t: float) -> Tensor:
    """s * psi at the target; s * (t c + t - 1) at hard negatives (c > psi) when t > 1; s * c elsewhere."""
    target = F.one_hot(labels, cos.shape[1]).bool()
    logits = s * cos
    if t != 1.0:
        hard = (cos > psi.detach()[:, None]) & ~target
        logits = torch.where(hard, s * (t * cos + t - 1.0), logits)
    return torch.where(target, s * psi[:, None], logits)


def focal(row_loss: Tensor, gamma: float) -> Tensor:
    """face.evoLVe's focal term on the per-row loss: (1 - p)^gamma * loss with p = exp(-loss)."""
    if gamma == 0.0:
        return row_loss
    return (1.0 - torch.exp(-row_loss)) ** gamma * row_loss


def reference_forward(x: Tensor, weight: Tensor, labels: Tensor, margin: Margin, s: float, t: float,
                      gamma: float = 0.0, step: int = 0) -> tuple[Tensor, Tensor]:
    """(mean loss, accuracy) where accuracy is the fraction of rows whose target cosine is the max."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xn = F.normalize(x.to(dtype), dim=1)
    wn = F.normalize(weight.to(dtype), dim=1)
    cos = xn @ wn.t()
    c_y = cos.gather(1, labels[:, None])[:, 0]
    psi = margin.psi(c_y, step)
    logits = modified_logits(cos, labels, psi, s, t)
    row = F.cross_entropy(logits, labels, reduction="none")
    with torch.no_grad():
        acc = (cos.argmax(1) == labels).to(dtype).mean()
    return focal(row, gamma).mean(), acc
