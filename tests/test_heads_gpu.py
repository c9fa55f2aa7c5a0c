"""The fused Triton head on a real CUDA device: every margin against a float64 reference, bf16/fp16
inputs, determinism, and no B x C allocation at a million classes.

Run by bench/gpu_check.sh; skipped on machines without CUDA (the CPU path of the same kernels is
tested under TRITON_INTERPRET=1 in tests/test_heads_fused.py)."""

from __future__ import annotations

import pytest
import torch

from heads import MarginHead
from tests._heads_util import MARGINS, make_data

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
)


def _loss_and_grads(impl: str, margin: str, kw: dict, x, w, y, device: str, dtype, t: float = 1.0):
    head = MarginHead(w.shape[0], w.shape[1], margin=margin, impl=impl, t=t, **kw).to(
        device=device, dtype=dtype
    )
    with torch.no_grad():
        head.weight.copy_(w.to(device=device, dtype=dtype))
    xx = x.to(device=device, dtype=dtype).requires_grad_()
    loss = head(xx, y.to(device))
    gx, gw = torch.autograd.grad(loss, [xx, head.weight])
    return [v.detach().double().cpu() for v in (loss, gx, gw)]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


@pytest.mark.parametrize("margin,kw", MARGINS)
@pytest.mark.parametrize("t", [1.0, 1.2])
def test_fused_fp32_matches_float64(margin: str, kw: dict, t: float) -> None:
    x, w, y = make_data(133, 1030, 96)  # not multiples of any tile size
    exact = _loss_and_grads("reference", margin, kw, x, w, y, "cpu", torch.float64, t)
    got = _loss_and_grads("fused", margin, kw, x, w, y, "cuda", torch.float32, t)
    for name, a, e in zip(("loss", "dX", "dW"), got, exact):
        assert _rel_err(a, e) < 1e-4, (margin, t, name, _rel_err(a, e))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("margin,kw", [("cosface", {}), ("arcface", {}), ("sphereface", {"m": 4})])
def test_fused_low_precision_no_worse_than_reference(dtype, margin: str, kw: dict) -> None:
    x, w, y = make_data(256, 5000, 128, seed=3)
    exact = _loss_and_grads("reference", margin, kw, x, w, y, "cpu", torch.float64, 1.1)
    ref = _loss_and_grads("reference", margin, kw, x, w, y, "cuda", dtype, 1.1)
    got = _loss_and_grads("fused", margin, kw, x, w, y, "cuda", dtype, 1.1)
    for name, a, r, e in zip(("loss", "dX", "dW"), got, ref, exact):
        # Inputs are rounded to `dtype` either way; fp32 accumulation must not add error on top.
        assert _rel_err(a, e) <= _rel_err(r, e) + 2e-3, (name, _rel_err(a, e), _rel_err(r, e))


def test_fused_is_bitwise_deterministic() -> None:
    x, w, y = make_data(512, 20000, 256, seed=4)
    first = _loss_and_grads("fused", "arcface", {}, x, w, y, "cuda", torch.bfloat16, 1.2)
    second = _loss_and_grads("fused", "arcface", {}, x, w, y, "cuda", torch.bfloat16, 1.2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_million_classes_without_a_batch_by_class_tensor() -> None:
    B, C, D = 512, 1_000_000, 512
    device = torch.device("cuda")
    head = MarginHead(C, D, margin="arcface", impl="fused").to(device)
    x = torch.randn(B, D, device=device, requires_grad=True)
    y = torch.randint(0, C, (B,), device=device)
    head(x, y).backward()  # warm-up: kernels compiled
    # Drop the warm-up's gradients before the baseline: counted in `before`, their 2 GB would be freed
    # during the step and offset the new dW, so subtracting grad_w_bytes below would let any single
    # B x C fp32 tensor through.
    head.weight.grad = None
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    loss = head(x, y)
    loss.backward()
    torch.cuda.synchronize()
    working = torch.cuda.max_memory_allocated(device) - before
    logits_bytes = B * C * 4
    grad_w_bytes = C * D * 4  # the one gradient any implementation must hold
    # The backward's per-program dX partials (no atomics): at most 2 x SMs programs, each B x D fp32;
    # 277 MB on a 132-SM H100, more than logits_bytes / 8 on its own.
    partials_bytes = 2 * torch.cuda.get_device_properties(device).multi_processor_count * B * D * 4
    assert torch.isfinite(loss)
    assert working - grad_w_bytes - partials_bytes < logits_bytes / 8, (
        working,
        grad_w_bytes,
        partials_bytes,
        logits_bytes,
    )
