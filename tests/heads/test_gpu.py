"""The fused Triton head on a real CUDA device: every margin against a float64 reference with exact
fp32 operands and with the default bf16 tensor-core operands, bf16/fp16 inputs, the chunked engine's
cuBLAS bf16 path, determinism, the kernels' registers and spills, no B x C allocation at a million
classes, the fused SGD step (heads/fused_step.py) against torch.optim.SGD, and a bf16 weight gradient
(weight.grad_dtype) through the backward and that step.

Run by bench/gpu_check.sh; skipped on machines without CUDA (the CPU path of the same kernels is
tested under TRITON_INTERPRET=1 in tests/heads/test_fused.py)."""

from __future__ import annotations

import pytest
import torch

from heads import MarginHead
from tests._heads_util import MARGINS, make_data, needs_grad_dtype

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
)


def _loss_and_grads(impl: str, margin: str, kw: dict, x, w, y, device: str, dtype, t: float = 1.0, **head_kw):
    # untuned fixed configs unless a test asks otherwise: each autotune compiles every config, and
    # the GPU check's time is short
    head_kw.setdefault("deterministic", True)
    classes = w.shape[0] // head_kw.get("subcenters", 1)
    head = MarginHead(classes, w.shape[1], margin=margin, impl=impl, t=t, **head_kw, **kw).to(
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
    got = _loss_and_grads("fused", margin, kw, x, w, y, "cuda", torch.float32, t, operands="fp32")
    for name, a, e in zip(("loss", "dX", "dW"), got, exact):
        assert _rel_err(a, e) < 1e-4, (margin, t, name, _rel_err(a, e))


@pytest.mark.parametrize("save_logits", [False, True])
@pytest.mark.parametrize("K", [2, 3])
def test_fused_subcenters_match_float64(K: int, save_logits: bool) -> None:
    """Sub-center heads compiled for this GPU (the K constexpr, K > 1's configs), recomputing or
    saving the cosines: exact fp32 operands against float64; the default fp16 operands within the
    reference's own error on fp16-rounded inputs plus 3e-3 (5e-3 reading the saved fp16 cosines)."""
    x, _, y = make_data(133, 1030, 96)
    w = torch.randn(1030 * K, 96, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = {"subcenters": K, "save_logits": save_logits}
    exact = _loss_and_grads("reference", "arcface", {}, x, w, y, "cpu", torch.float64, subcenters=K)
    rounded = _loss_and_grads(
        "reference",
        "arcface",
        {},
        x.half().double(),
        w.half().double(),
        y,
        "cpu",
        torch.float64,
        subcenters=K,
    )
    fp32 = _loss_and_grads("fused", "arcface", {}, x, w, y, "cuda", torch.float32, operands="fp32", **kw)
    fp16 = _loss_and_grads("fused", "arcface", {}, x, w, y, "cuda", torch.float32, **kw)
    tol = 5e-3 if save_logits else 3e-3
    for name, a, b, r, e in zip(("loss", "dX", "dW"), fp32, fp16, rounded, exact):
        assert _rel_err(a, e) < 1e-4, (K, save_logits, name, _rel_err(a, e))
        assert _rel_err(b, e) <= _rel_err(r, e) + tol, (K, save_logits, name, _rel_err(b, e))


@pytest.mark.parametrize("impl", ["fused", "chunked"])
@pytest.mark.parametrize("operands,tol", [("auto", 3e-3), ("bf16", 1e-2)])
@pytest.mark.parametrize("margin,kw", MARGINS)
def test_low_precision_operands_no_worse_than_the_reference_in_bf16(
    impl: str, operands: str, tol: float, margin: str, kw: dict
) -> None:
    """fp32 embeddings and master weight through the tensor cores (auto: fp16 operands; bf16 forced),
    fp32 accumulation: error against float64 within the reference's own error on bf16-rounded inputs
    (computed in fp32) plus a tolerance, for every margin at t = 1.1 (SV-Softmax). bf16's is wider:
    its rounding of dL/dcos for the backward's products adds up to ~6e-3 to dW at s = 64 (measured
    on the CPU with the same numerics, tests/heads/test_engines.py)."""
    x, w, y = make_data(200, 3000, 128, seed=7)
    exact = _loss_and_grads("reference", margin, kw, x, w, y, "cpu", torch.float64, 1.1)
    xb, wb = x.to(torch.bfloat16).double(), w.to(torch.bfloat16).double()
    ref = _loss_and_grads("reference", margin, kw, xb, wb, y, "cuda", torch.float32, 1.1)
    got = _loss_and_grads(
        impl, margin, kw, x, w, y, "cuda", torch.float32, 1.1, block=1024, operands=operands
    )
    for name, a, r, e in zip(("loss", "dX", "dW"), got, ref, exact):
        assert _rel_err(a, e) <= _rel_err(r, e) + tol, (
            impl,
            operands,
            margin,
            name,
            _rel_err(a, e),
            _rel_err(r, e),
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("margin,kw", [("cosface", {}), ("arcface", {}), ("sphereface", {"m": 4})])
def test_fused_low_precision_no_worse_than_reference(dtype, margin: str, kw: dict) -> None:
    x, w, y = make_data(256, 5000, 128, seed=3)
    exact = _loss_and_grads("reference", margin, kw, x, w, y, "cpu", torch.float64, 1.1)
    ref = _loss_and_grads("reference", margin, kw, x, w, y, "cuda", dtype, 1.1)
    got = _loss_and_grads("fused", margin, kw, x, w, y, "cuda", dtype, 1.1)
    for name, a, r, e in zip(("loss", "dX", "dW"), got, ref, exact):
        # Inputs are rounded to `dtype` either way; fp32 accumulation must not add much on top
        # (bf16 inputs: the operands are fp16, finer than the inputs; fp16: as the CPU emulation)
        assert _rel_err(a, e) <= _rel_err(r, e) + 3e-3, (name, _rel_err(a, e), _rel_err(r, e))


@pytest.mark.parametrize("deterministic", [False, True])
def test_fused_is_bitwise_deterministic(deterministic: bool) -> None:
    x, w, y = make_data(512, 20000, 256, seed=4)
    first = _loss_and_grads(
        "fused", "arcface", {}, x, w, y, "cuda", torch.bfloat16, 1.2, deterministic=deterministic
    )
    second = _loss_and_grads(
        "fused", "arcface", {}, x, w, y, "cuda", torch.bfloat16, 1.2, deterministic=deterministic
    )
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_kernels_report_registers_and_spills() -> None:
    from heads.fused import BWD_CONFIGS, FWD_CONFIGS

    head = MarginHead(20000, 512, margin="cosface", t=1.1, impl="fused").cuda()
    x = torch.randn(512, 512, device="cuda", requires_grad=True)
    head(x, torch.randint(0, 20000, (512,), device="cuda")).backward()
    kernels = head.engine("fused").kernels
    print("kernels:", kernels)  # the GPU check's log keeps the tuned configs, registers and spills
    assert set(kernels) == {"fwd", "bwd"}
    names = {str(c) for c in FWD_CONFIGS + BWD_CONFIGS}
    for report in kernels.values():
        assert report["config"] in names or "BB" in report["config"]  # ours, or Triton's Config repr
        assert report["n_regs"] > 0 and report["n_spills"] >= 0


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
    assert torch.isfinite(loss)
    # beyond dW: a B x chunk fp16 gradient block (32 MiB at the default chunk), the forward's
    # partials and some B x D vectors: far below one B x C fp32 tensor (the normalized fp16 copy
    # of W, C x D x 2 bytes, is made once per weight version: the warm-up's is still current)
    assert working - grad_w_bytes < logits_bytes / 8, (working, grad_w_bytes, logits_bytes)


def test_fused_sgd_step_is_torch_sgd_and_makes_the_next_wn() -> None:
    """heads.head_sgd.FusedHeadSGD on CUDA over three steps: W and momentum within 2 units in the last
    place of torch.optim.SGD's (foreach) on the same gradients (the same fused multiply-adds: expected
    bitwise), the engine's Wn and 1/|w| those of the normalize pass on the new W (fp16 Wn within one
    rounding), and the next forward launching no normalize pass (the engine keeps the step's copy)."""
    from heads.fused import FusedEngine
    from heads.head_sgd import FusedHeadSGD

    x, w, y = make_data(64, 3000, 128, seed=5)
    head = MarginHead(3000, 128, "arcface", impl="fused", deterministic=True).cuda()
    with torch.no_grad():
        head.weight.copy_(w.float())
    mirror = head.weight.detach().clone().requires_grad_()
    fused = FusedHeadSGD([head.weight], head=head, lr=0.5, momentum=0.9, weight_decay=5e-4)
    plain = torch.optim.SGD([mirror], lr=0.5, momentum=0.9, weight_decay=5e-4, foreach=True)
    engine = head.engine("fused")
    for _ in range(3):
        head(x.float().cuda(), y.cuda()).backward()
        mirror.grad = head.weight.grad.clone()
        fused.step()
        plain.step()
        fused.zero_grad()
        plain.zero_grad()
        for got, want in (
            (head.weight, mirror),
            (fused.state[head.weight]["momentum_buffer"], plain.state[mirror]["momentum_buffer"]),
        ):
            err = (got.detach() - want.detach()).abs().max().item()
            assert err <= 2 * 2.0**-24 * want.abs().max().item(), err
        _, rw, wn = engine._wn
        fresh = FusedEngine()
        assert (fresh.inv_norms(head.weight) - rw).abs().max().item() <= 2.0**-22 * rw.abs().max().item()
        assert (fresh._wn[2].float() - wn.float()).abs().max().item() <= 2.0**-10
        head(x.float().cuda(), y.cuda())
        assert engine._wn[2] is wn, "the forward remade Wn"


def truncate_to_bf16(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 toward zero, as Triton's interpreter converts (a GPU rounds to nearest)."""
    return (t.contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def bf16_gradient_check(
    device: str, save_logits: bool, to_bf16=lambda t: t.to(torch.bfloat16), size=(96, 2000, 128)
) -> None:
    """The body of test_bf16_weight_gradient_is_the_fp32_one_rounded, `to_bf16` the kernel's rounding
    (tests/heads/test_fused.py runs it under the interpreter with `truncate_to_bf16`, smaller)."""
    from heads.head_sgd import FusedHeadSGD

    B, C, D = size
    x, w, y = make_data(B, C, D, seed=7)
    heads = {}
    for grad in (torch.float32, torch.bfloat16):
        head = MarginHead(C, D, "arcface", impl="fused", deterministic=True, save_logits=save_logits)
        head = head.to(device)
        with torch.no_grad():
            head.weight.copy_(w.float())
        head.weight.grad_dtype = grad
        heads[grad] = head
    xs, ys = x.float().to(device), y.to(device)
    for head in heads.values():
        head(xs, ys).backward()
    g32, g16 = heads[torch.float32].weight.grad, heads[torch.bfloat16].weight.grad
    assert g16.dtype == torch.bfloat16 and g32.dtype == torch.float32
    # the same fp32 sums rounded once to nearest; the target rows' exact terms are added after the
    # kernel's rounding, so they may be one bf16 step off
    rows = torch.ones(C, dtype=torch.bool, device=device)
    rows[ys] = False
    assert torch.equal(g16[rows], to_bf16(g32[rows]))
    step = (g32[~rows].abs().to(torch.bfloat16).float() * 2.0**-7).clamp_min(2.0**-133)
    assert ((g16[~rows].float() - g32[~rows]).abs() <= step).all()
    # FusedHeadSGD's fused pass over the bf16 gradient: torch's SGD over its fp32 value, fp32 momentum
    head = heads[torch.bfloat16]
    mirror = head.weight.detach().clone().requires_grad_()
    fused = FusedHeadSGD([head.weight], head=head, lr=0.5, momentum=0.9, weight_decay=5e-4)
    plain = torch.optim.SGD([mirror], lr=0.5, momentum=0.9, weight_decay=5e-4, foreach=True)
    for i in range(3):
        if i:
            head(xs, ys).backward()
        mirror.grad = head.weight.grad.float()
        assert fused._fused_engine(fused.param_groups[0], head.weight) is not None  # the Triton pass
        fused.step()
        plain.step()
        assert fused.state[head.weight]["momentum_buffer"].dtype == torch.float32
        fused.zero_grad()
        plain.zero_grad()
        err = (head.weight.detach() - mirror.detach()).abs().max().item()
        assert err <= 2 * 2.0**-24 * mirror.abs().max().item(), (i, err)


@needs_grad_dtype
@pytest.mark.parametrize("save_logits", [False, True])
def test_bf16_weight_gradient_is_the_fp32_one_rounded(save_logits: bool) -> None:
    """weight.grad_dtype = bf16 on this GPU: the backward's bf16 dW tiles (TMA stores on sm_90) are the
    fp32 run's dW rounded to nearest, bit for bit outside the target rows; FusedHeadSGD's fused step
    reads it as torch's SGD reads its fp32 value, momentum fp32."""
    bf16_gradient_check("cuda", save_logits)
