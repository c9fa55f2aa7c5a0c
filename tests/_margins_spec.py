"""The margins after ArcFace written straight from their papers' formulas (issue 24's definitions), in
float64 with autograd and plain Python state: the reference the heads' engines are checked against,
independent of heads/margins.py. `run_two_steps` trains two steps (the running state moves) and
returns per step (loss, dL/dx, dL/dW, the state after it)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEW_MARGINS = ("adaface", "magface", "curricularface")
BUFFER = {"mean": "margin_batch_mean", "std": "margin_batch_std", "t": "margin_t"}  # state key -> head's


def state_matches(head, state: dict, rel: float) -> bool:
    """The head's running-state buffers equal the formula's state (to `rel`)."""
    return all(abs(getattr(head, BUFFER[k]).item() - v) <= rel * abs(v) for k, v in state.items())


def spec_loss(x, w, y, name: str, state: dict, training: bool, s: float = 64.0, subcenters: int = 1):
    """The mean loss; moves `state` (floats) first when training. `subcenters` K: w holds K rows per
    class (class j's rows j K .. j K + K - 1), a class's cosine the largest of its K."""
    xn, wn = x / x.norm(dim=1, keepdim=True), w / w.norm(dim=1, keepdim=True)
    c = (xn @ wn.t()).view(x.shape[0], -1, subcenters).max(2).values
    target = F.one_hot(y, c.shape[1]).bool()
    c_y = c[target]
    theta = torch.acos(c_y.clamp(-1.0, 1.0))
    logits = s * c
    extra = 0.0
    if name == "arcface":
        m = 0.5
        tgt = s * torch.where(c_y > math.cos(math.pi - m), torch.cos(theta + m), c_y - m * math.sin(m))
    elif name == "adaface":
        m, h, alpha = 0.4, 0.333, 0.01
        a = x.norm(dim=1).detach().clip(0.001, 100.0)
        if training:
            state["mean"] = alpha * a.mean().item() + (1 - alpha) * state["mean"]
            state["std"] = alpha * a.std().item() + (1 - alpha) * state["std"]
        z = ((a - state["mean"]) / (state["std"] + 1e-3) * h).clip(-1.0, 1.0)
        tgt = s * (torch.cos((theta - m * z).clip(1e-3, math.pi - 1e-3)) - (m + m * z))
    elif name == "magface":
        l_a, u_a, l_m, u_m, lam = 10.0, 110.0, 0.45, 0.8, 35.0
        a = x.norm(dim=1).clamp(l_a, u_a)
        m = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
        tgt = s * torch.cos(theta + m)
        extra = lam * (a / u_a**2 + 1.0 / a).mean()
    elif name == "curricularface":
        m = 0.5
        if training:
            state["t"] = 0.01 * c_y.mean().item() + 0.99 * state["t"]
        ctm = torch.where(c_y > math.cos(math.pi - m), torch.cos(theta + m), c_y - m * math.sin(math.pi - m))
        hard = (c > ctm.detach()[:, None]) & ~target
        logits = torch.where(hard, s * c * (state["t"] + c), logits)
        tgt = s * ctm
    else:
        raise ValueError(name)
    logits = torch.where(target, tgt[:, None], logits)
    return F.cross_entropy(logits, y) + extra


def initial_state(name: str) -> dict:
    return {"adaface": {"mean": 20.0, "std": 100.0}, "curricularface": {"t": 0.0}}.get(name, {})


def step_data(x, w, step: int):
    """Step `step`'s embeddings and weights: scaled and shifted so the norms and cosines move."""
    g = torch.Generator().manual_seed(100 + step)
    return x * (1.0 + 0.4 * step), w + 0.3 * step * torch.randn(w.shape, generator=g, dtype=w.dtype)


def run_two_steps(loss_fn, x, w, y, dtype=torch.float64):
    """[(loss, dx, dw), ...] over two training steps; `loss_fn(x, w, y) -> (loss, the leaf w is in)`
    keeps its own state."""
    out = []
    for step in range(2):
        xs, ws = step_data(x, w, step)
        xs = xs.to(dtype).requires_grad_()
        loss, leaf = loss_fn(xs, ws.to(dtype), y)
        dx, dw = torch.autograd.grad(loss, [xs, leaf])
        out.append((loss.detach(), dx, dw))
    return out


def spec_two_steps(name: str, x, w, y, subcenters: int = 1):
    state = initial_state(name)

    def loss_fn(xs, ws, ys):
        ws = ws.requires_grad_()
        return spec_loss(xs, ws, ys, name, state, True, subcenters=subcenters), ws

    return run_two_steps(loss_fn, x, w, y), state


def head_two_steps(head, x, w, y, dtype=torch.float64):
    """The same two steps through a head (in training mode): its weight takes each step's values."""

    def loss_fn(xs, ws, ys):
        with torch.no_grad():
            head.weight.copy_(ws)
        return head(xs, ys), head.weight

    return run_two_steps(loss_fn, x, w, y, dtype)


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def data(B: int = 37, C: int = 70, D: int = 40, seed: int = 0):
    """float64 x (norms around 15-25, so AdaFace's z and MagFace's m vary), w, y (last class used)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * (
        2.0 + torch.rand(B, 1, generator=g, dtype=torch.float64) * 2
    )
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    y[-1] = C - 1
    x[:6] += 6.0 * w[y[:6]]  # rows close to their centre: CurricularFace's rows without hard negatives
    return x, w, y
