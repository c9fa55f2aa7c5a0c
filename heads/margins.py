"""Target-logit margins: psi(c_y) on the B gathered target cosines, and its derivative.

Every implementation applies the margin outside the class loop, so one kernel serves all
margins. `psi` is written with differentiable torch ops (the reference uses autograd through
it); `dpsi` is the closed form the chunked and fused backward passes use. Tests check they agree.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# sin(theta) is floored at sqrt(EPS): cos(theta + m) has an unbounded derivative at theta = 0,
# and the floor keeps the exact gradient finite when an embedding equals its class centre.
EPS = 1e-6


def _sin_theta(c: Tensor) -> Tensor:
    return torch.sqrt(torch.clamp(1.0 - c * c, min=EPS))


class _SafeAcos(torch.autograd.Function):
    """acos whose derivative uses the floored sin(theta) above (finite at c = +-1)."""

    @staticmethod
    def forward(ctx, c: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(c)
        return torch.acos(c.clamp(-1.0, 1.0))

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        (c,) = ctx.saved_tensors
        return -g / _sin_theta(c)


def safe_acos(c: Tensor) -> Tensor:
    return _SafeAcos.apply(c)


class Margin:
    """psi(c) for the target logit (the logit itself is s * psi). A subclass sets `name`, its scale
    `default_s` and `options`: the keyword arguments its constructor takes (what `build_margin`
    accepts for it; `m` among them where the margin has one); then it goes into `MARGINS` below."""

    name = "none"
    default_s = 1.0
    options: tuple[str, ...] = ()

    def psi(self, c: Tensor, step: int = 0) -> Tensor:
        return c

    def dpsi(self, c: Tensor, step: int = 0) -> Tensor:
        return torch.ones_like(c)


class CosFace(Margin):
    name = "cosface"
    default_s = 30.0
    options = ("m",)

    def __init__(self, m: float = 0.35) -> None:
        self.m = float(m)

    def psi(self, c: Tensor, step: int = 0) -> Tensor:
        return c - self.m

    def dpsi(self, c: Tensor, step: int = 0) -> Tensor:
        return torch.ones_like(c)


class ArcFace(Margin):
    """cos(theta + m); where c <= cos(pi - m), the fallback c - m sin(m) keeps psi monotonic."""

    name = "arcface"
    default_s = 64.0
    options = ("m",)

    def __init__(self, m: float = 0.5) -> None:
        self.m = float(m)
        self.th = math.cos(math.pi - self.m)
        self.mm = math.sin(self.m) * self.m

    def psi(self, c: Tensor, step: int = 0) -> Tensor:
        arc = c * math.cos(self.m) - _sin_theta(c) * math.sin(self.m)
        return torch.where(c > self.th, arc, c - self.mm)

    def dpsi(self, c: Tensor, step: int = 0) -> Tensor:
        s = _sin_theta(c)
        # d/dc [c cos m - sqrt(max(1-c^2, eps)) sin m]; the floor has zero slope where it binds
        ds = torch.where(1.0 - c * c > EPS, -c / s, torch.zeros_like(c))
        arc = math.cos(self.m) - ds * math.sin(self.m)
        return torch.where(c > self.th, arc, torch.ones_like(c))


def _chebyshev(m: int, c: Tensor) -> tuple[Tensor, Tensor]:
    """T_m(c) = cos(m theta) and U_{m-1}(c) = sin(m theta) / sin(theta), by the recurrences."""
    t_prev, t_cur = torch.ones_like(c), c
    u_prev, u_cur = torch.zeros_like(c), torch.ones_like(c)  # U_{-1}, U_0
    for _ in range(m - 1):
        t_prev, t_cur = t_cur, 2 * c * t_cur - t_prev
        u_prev, u_cur = u_cur, 2 * c * u_cur - u_prev
    return (t_cur if m >= 1 else torch.ones_like(c)), u_cur


class SphereFace(Margin):
    """A-Softmax, normalized: psi = (-1)^k cos(m theta) - 2k, annealed as (lambda c + psi) / (1 + lambda)
    with lambda = max(lambda_min, lambda_base * (1 + gamma * step) ** -power) (the paper's schedule)."""

    name = "sphereface"
    default_s = 30.0
    options = ("m", "lambda_base", "lambda_min", "gamma", "power")

    def __init__(self, m: int = 4, lambda_base: float = 1000.0, lambda_min: float = 5.0,
                 gamma: float = 0.12, power: float = 1.0) -> None:
        if int(m) != m or m < 1:
            raise ValueError(f"sphereface m must be a positive integer, got {m}")
        self.m = int(m)
        self.lambda_base, self.lambda_min = float(lambda_base), float(lambda_min)
        self.gamma, self.power = float(gamma), float(power)

    def lam(self, step: int) -> float:
        return max(self.lambda_min, self.lambda_base * (1.0 + self.gamma * step) ** (-self.power))

    def _k(self, c: Tensor) -> Tensor:
        theta = torch.acos(c.detach().clamp(-1.0, 1.0))
        return torch.clamp(torch.floor(self.m * theta / math.pi), 0, self.m - 1)

    def psi(self, c: Tensor, step: int = 0) -> Tensor:
        k = self._k(c)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
        t_m, _ = _chebyshev(self.m, c)
        lam = self.lam(step)
        return (lam * c + sign * t_m - 2.0 * k) / (1.0 + lam)

    def dpsi(self, c: Tensor, step: int = 0) -> Tensor:
        k = self._k(c)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
        _, u = _chebyshev(self.m, c)
        lam = self.lam(step)
        return (lam + sign * self.m * u) / (1.0 + lam)


class Combined(Margin):
    """cos(m1 theta + m2) - m3 (InsightFace's combined margin)."""

    name = "combined"
    default_s = 64.0
    options = ("m1", "m2", "m3")

    def __init__(self, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2) -> None:
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)

    def psi(self, c: Tensor, step: int = 0) -> Tensor:
        return torch.cos(self.m1 * safe_acos(c) + self.m2) - self.m3

    def dpsi(self, c: Tensor, step: int = 0) -> Tensor:
        theta = torch.acos(c.clamp(-1.0, 1.0))
        return self.m1 * torch.sin(self.m1 * theta + self.m2) / _sin_theta(c)


MARGINS: dict[str, type[Margin]] = {cls.name: cls for cls in (CosFace, ArcFace, SphereFace, Combined, Margin)}
DEFAULT_SCALE = {name: cls.default_s for name, cls in MARGINS.items()}


def build_margin(name: str, m: float | None = None, **options: float) -> Margin:
    """The margin by name; `m` is the margin (sphereface: the integer m; combined: ignored, use m1/m2/m3).
    An option the margin does not take is a ValueError naming it and the ones it takes."""
    cls = MARGINS.get(name)
    if cls is None:
        raise ValueError(f"unknown margin {name!r}: expected one of {', '.join(MARGINS)}")
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        takes = ", ".join(o for o in cls.options if o != "m") or "none"
        raise ValueError(f"margin {name} does not take {', '.join(unknown)} (its options: {takes})")
    if m is not None and "m" in cls.options:
        options["m"] = m
    return cls(**options)
