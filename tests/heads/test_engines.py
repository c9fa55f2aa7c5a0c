"""heads/ on the CPU, around the engines: operand precision by device and dtype, the fused kernels'
config pruning and chunk sizing, the gradient handed to autograd without a copy, engine reuse, and
no Dynamo recompiles from the head's training step."""

from __future__ import annotations

import pytest
import torch

from heads import MarginHead
from heads.core import operand_dtype
from heads.fused import (
    BWD_CONFIGS,
    FWD_CONFIGS,
    TileConfig,
    configs_for,
    default_chunk,
    fitting,
    shared_bytes,
)
from tests._heads_util import MARGINS, make_data

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_operand_dtype_by_device_and_dtype() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert operand_dtype(CPU, dtype) == torch.float32  # no low-precision products on the CPU
        assert operand_dtype(CUDA, dtype, interpreting=True) == torch.float32  # interpreter: bf16 dot wrong
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # tensor cores, fp32 accumulation
        assert operand_dtype(CUDA, dtype) == torch.float16
    assert operand_dtype(CUDA, torch.float32, operands="bf16") == torch.bfloat16
    assert operand_dtype(CUDA, torch.float64) == torch.float64  # the tests' exact path stays exact
    assert operand_dtype(CUDA, torch.float32, operands="fp32") == torch.float32
    assert operand_dtype(CPU, torch.float32, operands="bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown operands"):
        operand_dtype(CPU, torch.float32, operands="tf32")
    with pytest.raises(ValueError, match="unknown operands"):
        MarginHead(3, 4, operands="int8")


def test_configs_are_pruned_by_shared_memory() -> None:
    # 16-bit X and Wn: bytes per stage = BB*BD*2 + BC*BD*2; the backward's phase 2 streams G (P2 x BC)
    # and X in slabs of 2 BD (P2 x 2BD), P2 = BB but at most 8192 / BC rows
    assert shared_bytes(TileConfig(128, 128, 64, 8, 3), "fwd", 2, 2, 2) == 3 * (128 * 64 * 2 + 128 * 64 * 2)
    bwd = TileConfig(128, 128, 64, 8, 3, slab=2)
    assert shared_bytes(bwd, "bwd", 2, 2, 2) == 3 * (64 * 128 * 2 + 64 * 128 * 2)
    # stored through a descriptor, each fp32 (128 x 128) dW tile is staged in shared memory too
    assert shared_bytes(bwd, "bwd", 2, 2, 2, dw_bytes=4) == 3 * (64 * 128 * 2 + 64 * 128 * 2) + 128 * 128 * 4
    assert shared_bytes(TileConfig(64, 128, 64, 8, 3, slab=2), "bwd", 2, 2, 2) == 3 * (
        64 * 128 * 2 + 64 * 128 * 2
    )
    assert shared_bytes(TileConfig(128, 64, 64, 4, 3, slab=2), "bwd", 2, 2, 2) == 3 * (
        128 * 64 * 2 + 128 * 128 * 2
    )
    # 256-wide slabs step 32 batch rows: G (32 x 128) and X (32 x 256) tiles, a (128 x 256) dW tile
    wide = TileConfig(128, 128, 64, 16, 3, slab=4)
    assert shared_bytes(wide, "bwd", 2, 2, 2, 4) == 3 * (32 * 128 * 2 + 32 * 256 * 2) + 128 * 256 * 4
    hopper, a100, consumer = 227 * 1024, 163 * 1024, 99 * 1024
    assert fitting(FWD_CONFIGS, "fwd", hopper, 2, 2, 2) == list(FWD_CONFIGS)
    assert fitting(FWD_CONFIGS, "fwd", a100, 2, 2, 2) == list(FWD_CONFIGS)  # 256 x 128: 144 KB
    assert fitting(BWD_CONFIGS, "bwd", a100, 2, 2, 2) == list(BWD_CONFIGS)
    # with descriptor stores (sm_90) the first backward config needs 200 KB: a Hopper's, not 99 KB
    assert fitting(BWD_CONFIGS, "bwd", hopper, 2, 2, 2, 4)[0] == BWD_CONFIGS[0]
    assert BWD_CONFIGS[0] not in fitting(BWD_CONFIGS, "bwd", consumer, 2, 2, 2, 4)
    small = fitting(FWD_CONFIGS, "fwd", 64 * 1024, 2, 2, 2)
    assert 0 < len(small) < len(FWD_CONFIGS)
    assert all(shared_bytes(c, "fwd", 2, 2, 2) <= 64 * 1024 for c in small)
    # a consumer card (99 KB) drops the 256 x 128 forward tile (144 KB), keeps the rest
    narrower = [c for c in FWD_CONFIGS if c.bb * c.bc < 256 * 128]
    assert fitting(FWD_CONFIGS, "fwd", consumer, 2, 2, 2) == narrower
    # nothing fits: the smallest config still runs (the compiler may then lower its stages)
    assert fitting(FWD_CONFIGS, "fwd", 1024, 2, 2, 2) == [FWD_CONFIGS[-1]]
    # every config has tiles of at least 64 (the interpreter's practical minimum, and wgmma's M)
    assert all(min(c.bb, c.bc, c.bd) >= 64 for c in FWD_CONFIGS + BWD_CONFIGS)


def test_launches_skip_the_configs_that_spill_with_k_or_without_descriptors() -> None:
    assert configs_for(BWD_CONFIGS, 1, tma=True) == BWD_CONFIGS
    for configs in (FWD_CONFIGS, BWD_CONFIGS):
        assert configs_for(configs, 2, tma=True) == tuple(c for c in configs if not c.one_row)
        assert configs_for(configs, 1, tma=False) == tuple(c for c in configs if not c.tma)
    # the backward's first config (128 x 128) and 64 x 128 spill at K = 2: the first left is 128 x 64
    assert (configs_for(BWD_CONFIGS, 2, True)[0].bb, configs_for(BWD_CONFIGS, 2, True)[0].bc) == (128, 64)
    # the forward's 256 x 128 tile needs descriptors (sm_90): an A100 starts at 128 x 128
    assert (configs_for(FWD_CONFIGS, 1, True)[0].bb, configs_for(FWD_CONFIGS, 1, False)[0].bb) == (256, 128)


def test_backward_chunk_sizes_the_gradient_block() -> None:
    # saved cosines: the block stays in L2 for the dX product (32 MiB)
    assert default_chunk(512, 1_000_000, 2, saved=True) == 32768  # 512 x 32768 bf16 = 32 MiB
    assert default_chunk(512, 1_000_000, 4, saved=True) == 16384
    # recomputing: up to 256 MiB, few launches
    assert default_chunk(512, 1_000_000, 2) == 262144
    assert default_chunk(64, 1_000_000, 2) == 1 << 20  # the whole class count, a power of two
    assert default_chunk(8, 300, 4) == 1024  # at least 1024 classes


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_weight_grad_is_the_engines_buffer_and_set_to_none_works(impl: str, monkeypatch) -> None:
    head = MarginHead(50, 8, impl=impl, block=16)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(6, 8), torch.randint(0, 50, (6,))
    seen = []
    if impl == "chunked":
        engine = head.engine("chunked")
        backward = engine.backward

        def spy(*args, **kwargs):
            dx, dw = backward(*args, **kwargs)
            seen.append(dw.data_ptr())
            return dx, dw

        monkeypatch.setattr(engine, "backward", spy)
    before = head.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        assert head.weight.grad is None
        head(x, y).backward()
        assert head.weight.grad is not None and head.weight.grad.shape == (50, 8)
        if seen:  # the C x D buffer the engine wrote is weight.grad itself: no copy
            assert head.weight.grad.data_ptr() == seen[-1]
        opt.step()
    assert not torch.equal(head.weight.detach(), before)


def test_engine_is_built_once() -> None:
    head = MarginHead(20, 8, impl="chunked", block=8)
    x, y = torch.randn(4, 8), torch.randint(0, 20, (4,))
    head(x, y)
    first = head.engine("chunked")
    head(x, y)
    assert head.engine("chunked") is first and len(head._engines) == 1


def test_compiled_model_does_not_recompile_as_the_step_changes() -> None:
    """The head's forward is kept out of Dynamo's graphs, so its Python-int step is never a guard
    (without that, this loop compiles 22 frames: one per step)."""
    from torch._dynamo.testing import CompileCounter

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.Linear(8, 6)
            self.head = MarginHead(10, 6, margin="sphereface", m=4, impl="chunked", block=4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x), y)

    torch._dynamo.reset()
    model, counter = Model(), CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x, y = torch.randn(4, 8), torch.randint(0, 10, (4,))
    losses = []
    for step in range(20):
        model.head.set_step(step * 100)
        loss = compiled(x, y)
        loss.backward()
        losses.append(loss.item())
    assert counter.frame_count <= 2, counter.frame_count
    assert losses[-1] != losses[0]  # the annealing did reach the head: lambda changed with the step


def test_low_precision_product_has_an_fp32_result() -> None:
    from heads.core import mm_f32

    a, b = torch.randn(5, 7), torch.randn(7, 3)
    for dtype in (torch.bfloat16, torch.float16):
        got = mm_f32(a.to(dtype), b.to(dtype))  # the CPU lacks out_dtype: widened product
        assert got.dtype == torch.float32
        assert torch.allclose(got, a.to(dtype).float() @ b.to(dtype).float(), rtol=2e-2, atol=2e-2)
    out = torch.ones(5, 3)
    mm_f32(a, b, out=out)
    assert torch.allclose(out, 1 + a @ b, atol=1e-6)


def test_out_dtype_product_falls_back_only_where_the_probe_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch.mm(out_dtype=) runs (CUDA; emulated here), an error of the real product (out of
    memory, a cuBLAS failure) propagates and the next call still takes the out_dtype path; only the
    one-time capability probe turns the fallback on (the CPU: below)."""
    from heads import core

    real, calls, fail = torch.mm, [], []

    def mm(a, b, *, out_dtype=None):
        calls.append(out_dtype)
        if fail:
            raise fail.pop()
        return real(a, b) if out_dtype is None else real(a.float(), b.float())

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(core, "_CAPABLE", {})
    a, b = torch.randn(4, 3).half(), torch.randn(3, 5).half()
    exact = real(a.float(), b.float())
    assert torch.equal(core.mm_f32(a, b), exact) and calls == [torch.float32, torch.float32]  # probe, product
    for err in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")):
        fail.append(err)
        with pytest.raises(type(err)):
            core.mm_f32(a, b)
        calls.clear()
        assert torch.equal(core.mm_f32(a, b), exact) and calls == [torch.float32], "still the fast path"


def test_out_dtype_product_unsupported_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from heads import core

    monkeypatch.setattr(core, "_CAPABLE", {})
    a, b = torch.randn(4, 3).bfloat16(), torch.randn(3, 5).bfloat16()
    with pytest.warns(RuntimeWarning, match="does not run for torch.bfloat16 on cpu"):
        got = core.mm_f32(a, b)  # this CPU build has no mm.dtype kernel
    assert got.dtype == torch.float32 and torch.equal(got, a.float() @ b.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        core.mm_f32(a, b)  # said once


@pytest.mark.parametrize("addmm_runs", [True, False])
def test_product_into_an_fp32_sum_is_one_addmm_where_it_runs(addmm_runs: bool, monkeypatch) -> None:
    """out += a @ b with 16-bit operands (the fused backward's dX per chunk): one
    torch.addmm(out_dtype=float32) into the fp32 sum where the probe finds it runs (CUDA; emulated
    here), else torch.mm(out_dtype=float32) and an add, said once; the same sum either way."""
    import warnings

    from heads import core

    real_mm, real_addmm, calls = torch.mm, torch.addmm, []

    def mm(a, b, *, out_dtype=None):
        calls.append("mm")
        return real_mm(a, b) if out_dtype is None else real_mm(a.float(), b.float())

    def addmm(acc, a, b, *, out_dtype=None, out=None):
        calls.append("addmm")
        if not addmm_runs:
            raise RuntimeError("self and mat2 must have the same dtype")
        return out.copy_(real_addmm(acc, a.float(), b.float()))

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)
    monkeypatch.setattr(core, "_CAPABLE", {})
    a, b = torch.randn(4, 3).half(), torch.randn(3, 5).half()
    acc = torch.ones(4, 5)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(2):
            core.mm_f32(a, b, out=acc)
    assert torch.allclose(acc, 1 + 2 * (a.float() @ b.float()), atol=1e-6)
    probes = ["mm", "addmm"]  # each probed once, then every product
    assert calls == probes + (["addmm"] * 2 if addmm_runs else ["mm"] * 2)
    assert len(said) == (0 if addmm_runs else 1)


@pytest.mark.parametrize("margin,kw", MARGINS)
def test_low_precision_operands_on_the_cpu_no_worse_than_the_reference(margin: str, kw: dict) -> None:
    """The GPU's numerics emulated on the CPU (chunked with fp16 or bf16 operands, exact products,
    fp32 sums): error against float64 within the reference's own error on inputs rounded to that
    dtype (computed in fp32), plus a small tolerance, t = 1.1. bf16 gets a wider one: dL/dcos
    rounded to bf16 for the backward's products adds up to ~6e-3 to dW at s = 64 (why CUDA's
    default is fp16)."""

    def run(impl: str, x, w, dtype, **head_kw):
        head = MarginHead(w.shape[0], w.shape[1], margin=margin, impl=impl, t=1.1, **head_kw, **kw)
        head = head.to(dtype)
        with torch.no_grad():
            head.weight.copy_(w.to(dtype))
        xx = x.to(dtype).requires_grad_()
        loss = head(xx, y)
        return [v.detach().double() for v in (loss, *torch.autograd.grad(loss, [xx, head.weight]))]

    def rel(a, b) -> float:
        return ((a - b).abs().max() / b.abs().max()).item()

    x, w, y = make_data(64, 700, 64, seed=7)
    exact = run("reference", x, w, torch.float64)
    for low, name, tol in ((torch.float16, "fp16", 2e-3), (torch.bfloat16, "bf16", 1e-2)):
        ref = run("reference", x.to(low).double(), w.to(low).double(), torch.float32)
        got = run("chunked", x, w, torch.float32, operands=name, block=256)
        for part, a, r, e in zip(("loss", "dX", "dW"), got, ref, exact):
            assert rel(a, e) <= rel(r, e) + tol, (name, part, rel(a, e), rel(r, e))


def test_target_terms_ignore_rows_another_rank_owns():
    """Sharded heads pass label -1 for rows owned elsewhere: they must neither add target terms nor
    clobber the last class's dW row (which duplicate-index writes would do if they disagreed)."""
    from heads.core import fix_target_terms, inv_norms

    gen = torch.Generator().manual_seed(0)
    b, c, d = 6, 5, 8
    xn = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1)
    weight = torch.randn(c, d, generator=gen)
    rw = inv_norms(weight)
    dcy = torch.randn(b, generator=gen)
    labels = torch.tensor([4, -1, 2, 4, -1, 0])
    own = labels >= 0

    def run(xn_, labels_, dcy_):
        dx = torch.zeros(len(labels_), d)
        dw = torch.zeros(c, d)
        fix_target_terms(xn_, xn_.half(), weight, rw, labels_, dcy_, dx, dw)
        return dx, dw

    dx, dw = run(xn, labels, torch.where(own, dcy, torch.zeros_like(dcy)))
    dx_own, dw_own = run(xn[own], labels[own], dcy[own])
    assert torch.equal(dw, dw_own) and dw[4].abs().sum() > 0
    assert torch.equal(dx[own], dx_own) and torch.equal(dx[~own], torch.zeros_like(dx[~own]))


def test_target_terms_exact_after_the_normalized_products() -> None:
    """fix_target_terms(normalized=True): after products that read G = dL/dcos and Wn = w r, both
    rounded to fp16, and scale dW's rows by r afterwards (the fused engine), the target column's
    share of dX and dW is exact (the target column alone here: the rest is the products' own)."""
    from heads.core import fix_target_terms, inv_norms

    gen = torch.Generator().manual_seed(1)
    b, c, d = 6, 5, 16
    xn = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1)
    weight = 3 * torch.randn(c, d, generator=gen)
    rw = inv_norms(weight)
    labels = torch.tensor([0, 3, 3, 1, 4, 0])
    dcy = 10 * torch.randn(b, generator=gen)
    xo, wn = xn.half(), (weight * rw[:, None]).half()
    target = torch.nn.functional.one_hot(labels, c).float()
    g_low = target * dcy.half().float()[:, None]
    dx = g_low @ wn.float()
    dw = rw[:, None] * (g_low.t() @ xo.float())
    fix_target_terms(xn, xo, weight, rw, labels, dcy, dx, dw, normalized=True)
    exact = target * dcy[:, None]
    for got, want in ((dx, (exact * rw) @ weight), (dw, rw[:, None] * (exact.t() @ xn))):
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), (got - want).abs().max()
