"""Target-logit margins: psi(c_y) on the B gathered target cosines, and its derivative.

Every implementation applies the margin outside the class loop, so one kernel serves all
margins. `psi` is written with differentiable torch ops (the reference uses autograd through
it); `dpsi` is the closed form the chunked and fused backward passes use. Tests check they agree.

Margins with per-row parameters (AdaFace, MagFace) make them from the raw embeddings' norms in
`rows` (which first moves the running state in a training forward); psi and dpsi take them as `p`.
Running state (AdaFace's norm statistics, CurricularFace's t) lives in the head as buffers, named
and initialized by the margin's `state`; every function here reads it from the `state` dict given.
CurricularFace also changes the hard non-target logits: `hard_t` hands the engines its t.
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
    state: dict[str, float] = {}  # running state: buffer name -> initial value
    uses_norms = False  # `rows` reads the raw embedding norms (AdaFace, MagFace)
    norm_gradient = False  # psi depends differentiably on p (dpsi_dp), p on the norms (MagFace)

    def rows(self, c: Tensor, norms: Tensor, state: dict[str, Tensor], training: bool) -> Tensor | None:
        """psi's per-row parameter p from the target cosines and the raw embedding norms (None: the
        margin has none). In a training forward the running state moves first, from this batch."""
        return None

    def psi(self, c: Tensor, step: int = 0, p: Tensor | None = None) -> Tensor:
        return c

    def dpsi(self, c: Tensor, step: int = 0, p: Tensor | None = None) -> Tensor:
        return torch.ones_like(c)

    def dpsi_dp(self, c: Tensor, step: int, p: Tensor) -> Tensor:
        """d psi / d p, read only for a margin with `norm_gradient` (p the norms); psi here does not
        depend on p."""
        return torch.zeros_like(c)

    def hard_t(self, state: dict[str, Tensor]) -> Tensor | None:
        """CurricularFace's t (0-d): non-target cosines above psi of their row become c (t + c)."""
        return None

    def regularizer(self, norms: Tensor) -> Tensor | None:
        """A term added to the mean loss, a function of the raw norms (MagFace's g(a)); None: none."""
        return None


class CosFace(Margin):
    name = "cosface"
    default_s = 30.0
    options = ("m",)

    def __init__(self, m: float = 0.35) -> None:
        self.m = float(m)

    def psi(self, c: Tensor, step: int = 0, p: Tensor | None = None) -> Tensor:
        return c - self.m

    def dpsi(self, c: Tensor, step: int = 0, p: Tensor | None = None) -> Tensor:
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

    def psi(self, c: Tensor, step: int = 0, p: Tensor | None = None) -> Tensor:
        arc = c * math.cos(self.m) - _sin_theta(c) * math.sin(self.m)
        return torch.where(c > self.th, arc, c - self.mm)

    def dpsi(self, c: Tensor, step: int = 0, p: Tensor | None = None) -> Tensor:
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

    def __init__(
        self,
        m: int = 4,
        lambda_base: float = 1000.0,
        lambda_min: float = 5.0,
        gamma: float = 0.12,
        power: float = 1.0,
    ) -> None:
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

    def psi(self, c: Tensor, step: int = 0, p: Tensor | None = None) -> Tensor:
        k = self._k(c)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)
        t_m, _ = _chebyshev(self.m, c)
        lam = self.lam(step)
        return (lam * c + sign * t_m - 2.0 * k) / (1.0 + lam)

    def dpsi(self, c: Tensor, step: int = 0, p: Tensor | None = None) -> Tensor:
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

    def psi(self, c: Tensor, step: int = 0, p: Tensor | None = None) -> Tensor:
        return torch.cos(self.m1 * safe_acos(c) + self.m2) - self.m3

    def dpsi(self, c: Tensor, step: int = 0, p: Tensor | None = None) -> Tensor:
        theta = torch.acos(c.clamp(-1.0, 1.0))
        return self.m1 * torch.sin(self.m1 * theta + self.m2) / _sin_theta(c)


class AdaFace(Margin):
    """AdaFace (Kim et al., CVPR 2022): cos(clip(theta - m z, eps, pi - eps)) - (m + m z), z the row's
    norm a = clip(|x|, 0.001, 100) standardized by running statistics (no gradient through a):
    z = clip((a - mean_r) / (std_r + 1e-3) h, -1, 1). A training forward first moves mean_r and
    std_r (unbiased) toward the batch's by t_alpha; an eval forward leaves them."""

    name = "adaface"
    default_s = 64.0
    options = ("m", "h", "t_alpha")
    state = {"batch_mean": 20.0, "batch_std": 100.0}
    uses_norms = True
    CLIP = 1e-3  # theta - m z is kept in [CLIP, pi - CLIP]

    def __init__(self, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01) -> None:
        self.m, self.h, self.t_alpha = float(m), float(h), float(t_alpha)

    def rows(self, c: Tensor, norms: Tensor, state: dict[str, Tensor], training: bool) -> Tensor:
        a = norms.detach().clamp(0.001, 100.0)
        mean, std = state["batch_mean"], state["batch_std"]
        if training:
            with torch.no_grad():
                mean.mul_(1.0 - self.t_alpha).add_(self.t_alpha * a.mean())
                std.mul_(1.0 - self.t_alpha).add_(self.t_alpha * a.std())
        return ((a - mean.to(a.dtype)) / (std.to(a.dtype) + 1e-3) * self.h).clamp(-1.0, 1.0)

    def _phi(self, c: Tensor, p: Tensor, theta: Tensor) -> Tensor:
        return (theta - self.m * p).clamp(self.CLIP, math.pi - self.CLIP)

    def psi(self, c: Tensor, step: int = 0, p: Tensor | None = None) -> Tensor:
        return torch.cos(self._phi(c, p, safe_acos(c))) - (self.m + self.m * p)

    def dpsi(self, c: Tensor, step: int = 0, p: Tensor | None = None) -> Tensor:
        raw = torch.acos(c.clamp(-1.0, 1.0)) - self.m * p
        inside = (raw >= self.CLIP) & (raw <= math.pi - self.CLIP)  # the clip's slope, as autograd's
        return torch.where(inside, torch.sin(raw) / _sin_theta(c), torch.zeros_like(c))


class MagFace(Margin):
    """MagFace (Meng et al., CVPR 2021): cos(theta + m(a)) with a = clamp(|x|, l_a, u_a) and m linear
    from l_m at l_a to u_m at u_a (gradient through a), plus lambda_g mean(a / u_a^2 + 1 / a)."""

    name = "magface"
    default_s = 64.0
    options = ("l_a", "u_a", "l_m", "u_m", "lambda_g")
    uses_norms = norm_gradient = True

    def __init__(
        self,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
    ) -> None:
        if not 0.0 < l_a < u_a:
            raise ValueError(f"magface needs 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
        self.l_a, self.u_a, self.l_m, self.u_m = float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g = float(lambda_g)
        self.slope = (self.u_m - self.l_m) / (self.u_a - self.l_a)

    def rows(self, c: Tensor, norms: Tensor, state: dict[str, Tensor], training: bool) -> Tensor:
        return norms

    def _m(self, a: Tensor) -> Tensor:
        return self.slope * (a.clamp(self.l_a, self.u_a) - self.l_a) + self.l_m

    def psi(self, c: Tensor, step: int = 0, p: Tensor | None = None) -> Tensor:
        return torch.cos(safe_acos(c) + self._m(p))

    def dpsi(self, c: Tensor, step: int = 0, p: Tensor | None = None) -> Tensor:
        return torch.sin(torch.acos(c.clamp(-1.0, 1.0)) + self._m(p)) / _sin_theta(c)

    def dpsi_dp(self, c: Tensor, step: int, p: Tensor) -> Tensor:
        inside = (p >= self.l_a) & (p <= self.u_a)  # the clamp's slope, as autograd's
        d = -torch.sin(torch.acos(c.clamp(-1.0, 1.0)) + self._m(p)) * self.slope
        return torch.where(inside, d, torch.zeros_like(d))

    def regularizer(self, norms: Tensor) -> Tensor:
        a = norms.clamp(self.l_a, self.u_a)
        return self.lambda_g * (a / self.u_a**2 + 1.0 / a).mean()


class CurricularFace(ArcFace):
    """CurricularFace (Huang et al., CVPR 2020): the target ArcFace's cos(theta + m) (with its
    fallback); a non-target cosine above it becomes c (t + c), t = 0.01 mean(c_y) + 0.99 t moved
    first in a training forward (no gradient)."""

    name = "curricularface"
    default_s = 64.0
    options = ("m",)
    state = {"t": 0.0}

    def rows(self, c: Tensor, norms: Tensor, state: dict[str, Tensor], training: bool) -> None:
        if training:
            with torch.no_grad():
                state["t"].mul_(0.99).add_(0.01 * c.detach().mean())
        return None

    def hard_t(self, state: dict[str, Tensor]) -> Tensor:
        return state["t"]


MARGINS: dict[str, type[Margin]] = {
    cls.name: cls
    for cls in (CosFace, ArcFace, SphereFace, Combined, AdaFace, MagFace, CurricularFace, Margin)
}
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
