"""heads/: reference and chunked against a float64 reference, margins, extremes, precision, API.

The fused kernel's checks live in tests/heads/test_fused.py (they need TRITON_INTERPRET=1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from heads import HeadOptions, MarginHead
from heads.chunked import ChunkedEngine
from heads.core import head_rows
from heads.margin_head import init_centres
from heads.margins import ArcFace, Combined, CosFace, SphereFace, build_margin
from heads.reference import focal
from heads.sharded import ShardedMarginHead
from tests._heads_util import MARGINS, make_data


def _run(head: MarginHead, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor):
    with torch.no_grad():
        head.weight.copy_(w.to(head.weight.dtype))
    xx = x.clone().requires_grad_()
    loss = head(xx, y)
    gx, gw = torch.autograd.grad(loss, [xx, head.weight])
    return loss.detach(), gx, gw


def _head(margin: str, kw: dict, C: int, D: int, impl: str, dtype=torch.float64, **extra) -> MarginHead:
    return MarginHead(C, D, margin=margin, impl=impl, **extra, **kw).to(dtype)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    scale = max(b.abs().max().item(), 1e-12)
    assert (a.double() - b.double()).abs().max().item() <= rel * scale, (a, b)


@pytest.mark.parametrize("margin,kw", MARGINS)
@pytest.mark.parametrize("t", [1.0, 1.1, 1.2])
def test_chunked_matches_reference_float64(margin: str, kw: dict, t: float) -> None:
    x, w, y = make_data(9, 37, 12)
    ref = _run(_head(margin, kw, 37, 12, "reference", t=t), x, w, y)
    got = _run(_head(margin, kw, 37, 12, "chunked", t=t, block=16), x, w, y)
    for a, b in zip(got, ref):
        _close(a, b, 1e-10)


def test_arcface_fallback_branch_hit_and_matches() -> None:
    x, w, y = make_data(6, 20, 8)
    x[:3] = -w[y[:3]]  # theta = pi for the first rows: c_y = -1 <= cos(pi - m)
    margin = ArcFace(0.5)
    c = torch.tensor([-1.0, -0.95, 0.3], dtype=torch.float64)
    assert torch.allclose(margin.psi(c)[:2], c[:2] - 0.5 * math.sin(0.5))
    ref = _run(_head("arcface", {}, 20, 8, "reference"), x, w, y)
    got = _run(_head("arcface", {}, 20, 8, "chunked", block=7), x, w, y)
    for a, b in zip(got, ref):
        _close(a, b, 1e-10)


def test_focal_term_matches_reference() -> None:
    x, w, y = make_data(8, 25, 10, seed=3)
    ref = _run(_head("cosface", {}, 25, 10, "reference", gamma_focal=2.0), x, w, y)
    got = _run(_head("cosface", {}, 25, 10, "chunked", gamma_focal=2.0, block=8), x, w, y)
    plain = _run(_head("cosface", {}, 25, 10, "reference"), x, w, y)
    assert ref[0] < plain[0]  # the focal term down-weights easy rows
    for a, b in zip(got, ref):
        _close(a, b, 1e-10)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_no_margin_equals_cross_entropy_on_cosines(impl: str) -> None:
    x, w, y = make_data(7, 30, 9)
    head = MarginHead(30, 9, margin="cosface", s=1.0, m=0.0, t=1.0, impl=impl, block=8).double()
    loss, _, _ = _run(head, x, w, y)
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    assert torch.allclose(loss, F.cross_entropy(cos, y), atol=1e-12)


@pytest.mark.parametrize(
    "margin,kw,t",
    [("arcface", {}, 1.2), ("sphereface", {"m": 3}, 1.0), ("combined", {}, 1.1), ("cosface", {}, 1.0)],
)
def test_gradcheck_chunked(margin: str, kw: dict, t: float) -> None:
    x, w, y = make_data(3, 7, 5, seed=1)
    head = _head(margin, kw, 7, 5, "chunked", t=t, s=4.0, block=3, gamma_focal=0.5)
    x = x.requires_grad_()
    w = w.requires_grad_()

    def f(x_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        rows, _ = head_rows(
            F.normalize(x_, dim=1), w_, y, head.margin, 0, head.s, head.t, ChunkedEngine(head.block)
        )
        return focal(rows, head.gamma_focal).mean()

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "margin",
    [
        CosFace(0.35),
        ArcFace(0.5),
        SphereFace(1),
        SphereFace(2),
        SphereFace(3),
        SphereFace(4),
        Combined(1.0, 0.3, 0.2),
        Combined(1.2, 0.1, 0.05),
    ],
)
def test_dpsi_is_the_derivative_of_psi(margin) -> None:
    c = torch.linspace(-0.999, 0.999, 401, dtype=torch.float64, requires_grad=True)
    for step in (0, 50):
        (auto,) = torch.autograd.grad(margin.psi(c, step).sum(), c)
        assert torch.allclose(margin.dpsi(c.detach(), step), auto, atol=1e-9)


def test_sphereface_is_monotonic_and_anneals() -> None:
    m = SphereFace(4, lambda_base=1000.0, lambda_min=5.0, gamma=0.12, power=1.0)
    c = torch.linspace(-1, 1, 1001, dtype=torch.float64)
    assert (torch.diff(m.psi(c, 10**6)) > 0).all()
    assert m.lam(0) == 1000.0 and m.lam(10**6) == 5.0
    x, w, y = make_data(8, 20, 6)
    head = _head("sphereface", {"m": 4}, 20, 6, "chunked")
    early = _run(head, x, w, y)[0]
    head.set_step(10_000)
    late = _run(head, x, w, y)[0]
    assert late > early  # less of the plain softmax mixed in: a harder target


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_extremes_stay_finite(impl: str) -> None:
    C, D = 12, 16
    w = torch.randn(C, D, dtype=torch.float64)
    y = torch.arange(C) % C
    x = torch.cat([w[y[:6]] * 3.0, -w[y[6:]]])  # theta = 0 and theta = pi
    head = MarginHead(C, D, margin="arcface", s=64.0, m=0.5, t=1.2, impl=impl, block=5)
    loss, gx, gw = _run(head, x.float(), w.float(), y)
    assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    # all negatives hard, targets at theta = pi: losses above 100
    head2 = MarginHead(C, D, margin="arcface", s=64.0, m=0.5, t=1.2, impl=impl, block=5)
    loss2, gx2, gw2 = _run(head2, -w[y].float(), w.float(), y)
    assert loss2 > 100 and torch.isfinite(gx2).all() and torch.isfinite(gw2).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_no_worse_than_reference(dtype) -> None:
    x, w, y = make_data(32, 300, 64, seed=5)
    exact = _run(_head("arcface", {}, 300, 64, "reference", t=1.1), x, w, y)
    ref = _run(_head("arcface", {}, 300, 64, "reference", dtype, t=1.1), x.to(dtype), w, y)
    got = _run(_head("arcface", {}, 300, 64, "chunked", dtype, t=1.1, block=64), x.to(dtype), w, y)
    for a, r, e in zip(got, ref, exact):
        err_ref = (r.double() - e).abs().max().item()
        err_got = (a.double() - e).abs().max().item()
        assert err_got <= err_ref + 2e-3 * e.abs().max().item()


def test_block_size_does_not_change_the_result() -> None:
    x, w, y = make_data(10, 50, 16)
    runs = [
        _run(_head("cosface", {}, 50, 16, "chunked", torch.float32, t=1.2, block=b), x.float(), w, y)
        for b in (7, 16, 1000)
    ]
    for other in runs[1:]:
        for a, b in zip(other, runs[0]):
            _close(a, b, 1e-5)


def test_batch_of_one_and_classes_below_one_block() -> None:
    x, w, y = make_data(1, 3, 8)
    ref = _run(_head("arcface", {}, 3, 8, "reference", t=1.2), x, w, y)
    got = _run(_head("arcface", {}, 3, 8, "chunked", t=1.2, block=64), x, w, y)
    for a, b in zip(got, ref):
        _close(a, b, 1e-10)


def test_accuracy_and_auto_impl() -> None:
    x, w, y = make_data(40, 10, 8)
    x[:20] = w[y[:20]]  # these rows are certainly right
    head = MarginHead(10, 8, impl="auto").double()
    assert head.resolved_impl(torch.device("cpu")) == "chunked"
    with torch.no_grad():
        head.weight.copy_(w)
    loss, acc = head(x, y, return_accuracy=True)
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    expect = (cos.argmax(1) == y).double().mean()
    assert acc.item() == pytest.approx(expect.item()) and acc.item() >= 0.5
    assert head.last_accuracy is not None and head.last_accuracy.item() == acc.item()


def test_fused_on_cpu_without_interpreter_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    head = MarginHead(10, 8, impl="fused")
    with pytest.raises(RuntimeError, match="CUDA device, or TRITON_INTERPRET=1"):
        head(torch.randn(4, 8), torch.randint(0, 10, (4,)))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown margin"):
        build_margin("nope")
    with pytest.raises(ValueError, match="unknown impl"):
        MarginHead(3, 4, impl="gpu")
    with pytest.raises(ValueError, match="positive integer"):
        SphereFace(2.5)


@pytest.mark.parametrize("head_class", [MarginHead, ShardedMarginHead])
def test_both_heads_take_one_options_object_and_one_engine_factory(head_class) -> None:
    head = head_class(
        20,
        8,
        margin="sphereface",
        m=3,
        impl="chunked",
        block=4,
        operands="bf16",
        deterministic=True,
        lambda_min=0.0,
    )
    assert head.options == HeadOptions(
        margin="sphereface",
        m=3,
        impl="chunked",
        block=4,
        operands="bf16",
        deterministic=True,
        margin_options={"lambda_min": 0.0},
    )
    assert head.margin.m == 3 and head.margin.lambda_min == 0.0 and head.s == 30.0  # sphereface's scale
    engine = head.engine("chunked")
    assert isinstance(engine, ChunkedEngine) and engine.block == 4 and engine.operands == "bf16"
    fused = head_class(20, 8, impl="fused", operands="fp32", deterministic=True).engine("fused")
    assert fused.deterministic and fused.operands == "fp32"  # the sharded head used to drop both


@pytest.mark.parametrize("head_class", [MarginHead, ShardedMarginHead])
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"impl": "gpu"}, "unknown impl 'gpu'"),
        ({"operands": "int8"}, "unknown operands 'int8'"),
        ({"t": 0.5}, "SV-Softmax t must be >= 1"),
        ({"gamma_focal": -1.0}, "gamma_focal must be >= 0"),
        ({"s": 0.0}, "scale s must be positive"),
        ({"block": 0}, "block .* must be positive"),
        ({"margin": "nope"}, "unknown margin 'nope'"),
        (
            {"margin": "sphereface", "lamda_min": 1.0},
            r"margin sphereface does not take lamda_min "
            r"\(its options: lambda_base, lambda_min, gamma, power\)",
        ),
        ({"margin": "cosface", "m1": 0.2}, r"margin cosface does not take m1 \(its options: none\)"),
        ({"margin": "sphereface", "m": 2.5}, "positive integer"),
    ],
)
def test_bad_options_are_one_error_naming_the_option_in_both_heads(head_class, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        head_class(10, 4, **kwargs)


def test_initial_centres_depend_on_the_seed_alone() -> None:
    """A head's centres are init_centres(seed): torch's global generator neither decides nor moves."""
    state = torch.get_rng_state()
    torch.manual_seed(123)
    a = MarginHead(40, 6, seed=3)
    torch.manual_seed(456)
    b = MarginHead(40, 6, seed=3)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.weight, init_centres(40, 6, 0, 40, seed=3))
    assert not torch.equal(MarginHead(40, 6, seed=4).weight, a.weight)
    torch.set_rng_state(state)
    MarginHead(40, 6)
    assert torch.equal(torch.get_rng_state(), state), "building a head draws nothing from the global RNG"


def test_autocast_does_not_lower_the_head_precision() -> None:
    x, w, y = make_data(6, 20, 8)
    plain = _run(_head("arcface", {}, 20, 8, "chunked", torch.float32), x.float(), w, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = _run(_head("arcface", {}, 20, 8, "chunked", torch.float32), x.float(), w, y)
    for a, b in zip(amp, plain):
        _close(a, b, 1e-6)


def test_bench_runs_and_reports_against_the_reference() -> None:
    """`python -m bench.heads` on the CPU: chunked against the reference, every row and a headline,
    and the sub-center row (chunked, K = 3) against its K = 1 row (~25 s on 2 idle cores: four
    interpreters import torch)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo))
    cmd = [
        sys.executable,
        "-m",
        "bench.heads",
        "--device",
        "cpu",
        "--batch",
        "8",
        "--dim",
        "16",
        "--classes",
        "300",
        "--margins",
        "arcface",
        "--block",
        "64",
        "--repeats",
        "1",
        "--warmup",
        "0",
    ]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["baseline"] == "reference" and out["impl"] == "chunked"
    assert out["seconds"] > 0 and out["baseline_seconds"] > 0 and out["speedup"] > 0
    rows = {(r["impl"], r["classes"], r["subcenters"]) for r in out["rows"]}
    assert rows == {("reference", 300, 1), ("chunked", 300, 1), ("chunked", 300, 3)}
    assert all(r["fwd_ms"] > 0 and r["bwd_ms"] > 0 for r in out["rows"])
    sub = out["subcenters"]
    assert sub["K"] == 3 and sub["impl"] == "chunked" and sub["x_time_vs_k1"] > 0
    for bad, key in (
        (["--batch", "0"], "--batch"),
        (["--subcenters", "0"], "--subcenters"),
        (["--impls", "nope"], "--impls"),
        (["--device", "cpu", "--impls", "fused"], "fused"),
    ):  # refused before torch loads
        proc = subprocess.run(
            [sys.executable, "-m", "bench.heads", *bad],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and key in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
