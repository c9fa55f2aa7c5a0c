"""The fused Triton head under TRITON_INTERPRET=1, against a float64 reference.

The interpreter must be switched on before triton is first imported, so one subprocess runs this
file as a module (`python -m tests.heads.test_fused`) in a fresh interpreter: it runs every
`case_*` and prints one JSON line per case. Each case is then its own pytest item
(`test_fused_case[case_...]`), passing or failing with the case's own error.
"""

from __future__ import annotations

import pytest

from tests._interpreter import cases_in, run_cases
from tests._interpreter import interpreter_results as run_in_interpreter


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    """case name -> "ok" or the case's traceback, from one interpreter subprocess."""
    return run_in_interpreter("tests.heads.test_fused")


# ---- the cases (run only in the subprocess) --------------------------------------------------


def _setup():
    import torch
    import torch.nn.functional as F

    from heads.core import head_rows
    from heads.fused import BWD_CONFIGS, FWD_CONFIGS, FusedEngine
    from heads.margins import build_margin
    from heads.reference import focal, reference_forward
    from tests._heads_util import make_data as data

    def ref(x, w, y, margin, s, t, gamma=0.0):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss, acc = reference_forward(x, w, y, margin, s, t, gamma)
        gx, gw = torch.autograd.grad(loss, [x, w])
        return loss.detach(), gx, gw, acc

    small = {"fwd": FWD_CONFIGS[-1], "bwd": BWD_CONFIGS[-1]}  # 64 x 64 tiles: the quickest to interpret

    def fused(x, w, y, margin, s, t, gamma=0.0, dtype=torch.float32, grad_dtype=None, **eng):
        x = x.to(dtype).requires_grad_()
        w = w.to(dtype).requires_grad_()
        w.grad_dtype = grad_dtype  # torch's: None keeps w's dtype
        engine = FusedEngine(**{"configs": small, "chunk": 64, **eng})
        rows, correct = head_rows(F.normalize(x.float(), dim=1), w, y, margin, 0, s, t, engine)
        loss = focal(rows, gamma).mean()
        gx, gw = torch.autograd.grad(loss, [x, w])
        return loss.detach(), gx, gw, correct.mean()

    def close(a, b, rel):
        scale = max(b.abs().max().item(), 1e-12)
        err = (a.double() - b.double()).abs().max().item()
        assert err <= rel * scale, f"error {err:.3g} > {rel} * {scale:.3g}"

    return torch, build_margin, data, ref, fused, close


def case_all_margins_match_float64() -> None:
    torch, build_margin, data, ref, fused, close = _setup()
    x, w, y = data(37, 70, 40)  # not multiples of the 64-wide tiles; a label in the last tile
    cases = [("cosface", None, {}), ("arcface", None, {}), ("combined", None, {})]
    cases += [("sphereface", m, {"lambda_min": 0.0}) for m in (1, 2, 3, 4)]
    for name, m, kw in cases:
        margin = build_margin(name, m, **kw)
        for t in (1.0, 1.1, 1.2):
            e = ref(x, w, y, margin, 30.0, t)
            g = fused(x, w, y, margin, 30.0, t)
            for a, b in zip(g[:3], e[:3]):
                close(a, b, 2e-5)
            assert abs(g[3].item() - e[3].item()) < 1e-9, (name, t)


def case_arcface_fallback_and_focal() -> None:
    torch, build_margin, data, ref, fused, close = _setup()
    x, w, y = data(20, 33, 24, seed=2)
    x[:5] = -w[y[:5]]  # c_y = -1: the fallback branch
    margin = build_margin("arcface", 0.5)
    for gamma in (0.0, 2.0):
        e = ref(x, w, y, margin, 64.0, 1.2, gamma)
        g = fused(x, w, y, margin, 64.0, 1.2, gamma)
        for a, b in zip(g[:3], e[:3]):
            close(a, b, 2e-5)


def case_no_margin_is_cross_entropy() -> None:
    torch, build_margin, data, ref, fused, close = _setup()
    import torch.nn.functional as F

    x, w, y = data(9, 40, 16)
    loss = fused(x, w, y, build_margin("cosface", 0.0), 1.0, 1.0)[0]
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    assert abs(loss.item() - F.cross_entropy(cos, y).item()) < 1e-5


def case_every_config_the_tuner_may_pick() -> None:
    """Each config of each kernel (the autotuner's whole choice) against float64, over several chunks,
    recomputing the cosines in the backward and reading the saved ones."""
    torch, build_margin, data, ref, fused, close = _setup()
    from heads.fused import BWD_CONFIGS, FWD_CONFIGS

    x, w, y = data(37, 150, 72, seed=4)  # D = 72: two 64-wide D steps; 150 classes: 3 chunks of 64
    for name, t in (("arcface", 1.1), ("cosface", 1.0)):
        margin = build_margin(name, None)
        e = ref(x, w, y, margin, 64.0, t)
        for i in range(max(len(FWD_CONFIGS), len(BWD_CONFIGS))):
            configs = {"fwd": FWD_CONFIGS[i % len(FWD_CONFIGS)], "bwd": BWD_CONFIGS[i % len(BWD_CONFIGS)]}
            g = fused(x, w, y, margin, 64.0, t, configs=configs, programs=1 + i, save_logits=i % 2 == 1)
            for a, b in zip(g[:3], e[:3]):
                close(a, b, 2e-5)
            assert abs(g[3].item() - e[3].item()) < 1e-9, (name, configs)


def case_tiles_do_not_change_the_result() -> None:
    torch, build_margin, data, ref, fused, close = _setup()
    from heads.fused import BWD_CONFIGS, FWD_CONFIGS

    x, w, y = data(41, 300, 48, seed=4)
    margin = build_margin("arcface", 0.5)
    a = fused(x, w, y, margin, 64.0, 1.2, programs=3, chunk=64)
    big = {"fwd": FWD_CONFIGS[0], "bwd": BWD_CONFIGS[0]}
    b = fused(x, w, y, margin, 64.0, 1.2, configs=big, programs=1, chunk=256)
    for u, v in zip(a[:3], b[:3]):
        close(u, v, 1e-5)
    again = fused(x, w, y, margin, 64.0, 1.2, programs=3, chunk=64)
    assert all(torch.equal(u, v) for u, v in zip(a[:3], again[:3])), "not deterministic"
    saved = fused(x, w, y, margin, 64.0, 1.2, programs=3, chunk=64, save_logits=True)
    # fp32 operands: the saved cosines are the recomputed ones, bit for bit
    assert all(torch.equal(u, v) for u, v in zip(a[:3], saved[:3])), "saved logits differ"


def case_normalized_weight_follows_the_weight() -> None:
    """The engine's normalized copy of W is made once per weight version: the forward and backward
    of a step share it, and an in-place update (an optimizer step) makes a new one."""
    torch, build_margin, data, ref, fused, close = _setup()
    import torch.nn.functional as F

    from heads.core import head_rows
    from heads.fused import BWD_CONFIGS, FWD_CONFIGS, FusedEngine

    x, w, y = data(9, 40, 16)
    x, w = F.normalize(x.float(), dim=1), w.float().requires_grad_()
    margin = build_margin("cosface", 0.35)

    def engine():
        return FusedEngine(configs={"fwd": FWD_CONFIGS[-1], "bwd": BWD_CONFIGS[-1]}, chunk=64)

    def loss(eng):
        return head_rows(x, w, y, margin, 0, 30.0, 1.0, eng)[0].mean()

    kept = engine()
    loss(kept).backward()
    first = kept._wn[2]
    loss(kept)
    assert kept._wn[2] is first, "remade without a weight update"
    with torch.no_grad():
        w.mul_(1.5).add_(0.1)
    got, fresh = loss(kept), loss(engine())
    assert kept._wn[2] is not first and torch.equal(got, fresh), "stale normalized weight"


def case_interpreter_uses_fp32_operands() -> None:
    torch, *_ = _setup()
    from heads.fused import FusedEngine

    xn = torch.randn(4, 8)
    assert FusedEngine().operand_dtype(xn) == torch.float32
    assert FusedEngine().operand_dtype(xn.half()) == torch.float32  # the interpreter's bf16 dot is wrong
    assert FusedEngine(operands="fp32").operand_dtype(xn) == torch.float32


def case_small_shapes() -> None:
    torch, build_margin, data, ref, fused, close = _setup()
    margin = build_margin("cosface", 0.35)
    for B, C, D in ((1, 5, 8), (3, 1, 8), (2, 31, 40)):  # B = 1; C below one tile; one class only
        x, w, y = data(B, C, D)
        e = ref(x, w, y, margin, 30.0, 1.2)
        g = fused(x, w, y, margin, 30.0, 1.2)
        for a, b in zip(g[:3], e[:3]):
            close(a, b, 2e-5)


def case_pointer_tiles_as_on_an_a100() -> None:
    """The kernels' sm_80 code (pointer tiles with masks, `tma=False`; the other cases run the tensor
    descriptors of sm_90), each config an A100 launch may take, with and without saved cosines, one
    row a class and 2 sub-centers: float64's results."""
    torch, build_margin, data, ref, fused, close = _setup()
    from heads.fused import BWD_CONFIGS, FWD_CONFIGS, configs_for

    x, w, y = data(70, 150, 72, seed=5)  # D = 72: a partial 64-wide tile and a partial 128-wide slab
    margin = build_margin("arcface", 0.5)
    e = ref(x, w, y, margin, 30.0, 1.2)
    fwd, bwd = configs_for(FWD_CONFIGS, 1, tma=False), configs_for(BWD_CONFIGS, 1, tma=False)
    for i in range(max(len(fwd), len(bwd))):
        configs = {"fwd": fwd[i % len(fwd)], "bwd": bwd[i % len(bwd)]}
        g = fused(x, w, y, margin, 30.0, 1.2, tma=False, configs=configs, save_logits=i % 2 == 1)
        for a, b in zip(g[:3], e[:3]):
            close(a, b, 2e-5)
    from tests._margins_spec import data as spec_data
    from tests._margins_spec import head_two_steps, rel_err

    xs, _, ys = spec_data()
    ws = torch.randn(140, xs.shape[1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for save in (False, True):  # the K = 2 configs an A100 launch takes first
        ref2, head = _subcenter_heads(2, "arcface", tma=False, save_logits=save, deterministic=True)
        want, got = head_two_steps(ref2, xs, ws, ys), head_two_steps(head, xs, ws, ys, torch.float32)
        assert max(rel_err(p, q) for g, e in zip(got, want) for p, q in zip(g, e)) < 1e-5, save


def case_bf16_weight_gradient() -> None:
    """weight.grad_dtype = bf16 (the trainer's head.grad_dtype): the backward writes dW in bf16 (both
    modes, descriptor and pointer stores), each element float64's to within one bf16 step (2^-7
    relative: the interpreter's fp32 -> bf16 conversion truncates, where a GPU rounds to nearest,
    2^-8); loss and dX as with an fp32 dW; with fp16 operands too, where the target rows' exact
    terms are added into the bf16 dW after the kernel."""
    torch, build_margin, data, ref, fused, close = _setup()
    x, w, y = data(37, 150, 72, seed=8)
    margin = build_margin("arcface", 0.5)
    e = ref(x, w, y, margin, 64.0, 1.1)
    for save, tma in ((False, None), (True, None), (True, False)):
        g = fused(x, w, y, margin, 64.0, 1.1, grad_dtype=torch.bfloat16, save_logits=save, tma=tma)
        assert g[2].dtype == torch.bfloat16, g[2].dtype
        close(g[0], e[0], 2e-5)
        close(g[1], e[1], 2e-5)
        err = (g[2].double() - e[2]).abs()
        bound = 2.0**-7 * e[2].abs() + 2e-5 * e[2].abs().max()
        assert (err <= bound).all(), (save, tma, (err - bound).max().item())
        assert (g[2].double() != e[2].to(torch.float32).double()).any()  # it was rounded, not fp32
    # fp16 operands (the GPU's): the target rows' exact terms are added into the bf16 dW afterwards
    # (heads.core.fix_target_terms); dW within the fp16-operand run's own error plus two bf16 steps
    # (the kernel's rounding, and the target rows' after the terms are added)
    g16 = fused(x, w, y, margin, 64.0, 1.1, operands="fp16")
    b16 = fused(x, w, y, margin, 64.0, 1.1, operands="fp16", grad_dtype=torch.bfloat16)
    assert b16[2].dtype == torch.bfloat16
    err = (b16[2].double() - e[2]).abs()
    bound = (g16[2].double() - e[2]).abs() + 2.0**-6 * e[2].abs() + 1e-6 * e[2].abs().max()
    assert (err <= bound).all(), (err - bound).max().item()


def case_bf16_gradient_then_the_fused_step() -> None:
    """tests/heads/test_gpu.py's bf16-gradient check under the interpreter (its fp32 -> bf16
    conversion truncates): the bf16 dW is the fp32 one converted, bit for bit outside the target rows,
    and FusedHeadSGD's fused pass over it is torch's SGD over its fp32 value, in both modes."""
    from tests.heads.test_gpu import bf16_gradient_check, truncate_to_bf16

    for save in (False, True):
        bf16_gradient_check("cpu", save, truncate_to_bf16, size=(40, 300, 64))


def case_extremes_finite() -> None:
    torch, build_margin, data, ref, fused, close = _setup()
    _, w, _ = data(1, 24, 32)
    y = torch.arange(24)
    x = torch.cat([w[:12] * 2.0, -w[12:]])  # theta = 0 and theta = pi
    margin = build_margin("arcface", 0.5)
    for xx in (x, -w[y]):  # the second: every negative hard, every loss above 100
        loss, gx, gw, _ = fused(xx, w, y, margin, 64.0, 1.2)
        assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gw).all()
        e = ref(xx, w, y, margin, 64.0, 1.2)
        close(loss, e[0], 1e-5)
    assert loss.item() > 100


def case_low_precision() -> None:
    torch, build_margin, data, ref, fused, close = _setup()
    x, w, y = data(40, 90, 64, seed=6)
    margin = build_margin("cosface", 0.35)
    exact = ref(x, w, y, margin, 30.0, 1.1)
    for dtype in (torch.bfloat16, torch.float16):
        r = ref(x.to(dtype), w.to(dtype), y, margin, 30.0, 1.1)  # the reference at that precision
        g = fused(x, w, y, margin, 30.0, 1.1, dtype=dtype)
        assert g[1].dtype == dtype and g[2].dtype == dtype
        for a, rr, e in zip(g[:3], r[:3], exact[:3]):
            err_ref = (rr - e).abs().max().item()
            err_got = (a.double() - e).abs().max().item()
            assert err_got <= err_ref + 1e-2 * e.abs().max().item(), (dtype, err_got, err_ref)


def case_fp16_operands_as_on_the_gpu() -> None:
    """The GPU's operands (fp16 X and Wn, fp16 G; the interpreter's fp16 dot is right, its bf16 one is
    not): error against float64 within the reference's own on fp16-rounded inputs plus 1e-3
    (measured: +2e-4); with the saved fp16 cosines the wider 5e-3 (measured: +1.9e-3 on dW at
    s = 30: the cosines' rounding moves dL/dcos, the price of skipping the recompute)."""
    torch, build_margin, data, ref, fused, close = _setup()
    x, w, y = data(40, 90, 64, seed=6)
    margin = build_margin("cosface", 0.35)
    exact = ref(x, w, y, margin, 30.0, 1.1)
    rounded = ref(x.half().double(), w.half().double(), y, margin, 30.0, 1.1)
    for save, tol in ((False, 1e-3), (True, 5e-3)):
        got = fused(x, w, y, margin, 30.0, 1.1, operands="fp16", save_logits=save)
        for part, a, r, e in zip(("loss", "dX", "dW"), got[:3], rounded[:3], exact[:3]):
            scale = e.abs().max().item()
            err_got = (a.double() - e).abs().max().item() / scale
            err_ref = (r - e).abs().max().item() / scale
            assert err_got <= err_ref + tol, (save, part, err_got, err_ref)


def case_margins_after_arcface_match_float64_over_two_steps() -> None:
    """AdaFace, MagFace, CurricularFace (CurricularFace: the kernels' HARD=2 branch, recomputed and
    saved cosines) against the papers' formulas over two training steps (the state moves)."""
    import torch

    from heads import MarginHead
    from heads.fused import BWD_CONFIGS, FWD_CONFIGS, FusedEngine
    from tests._margins_spec import NEW_MARGINS, data, head_two_steps, rel_err, spec_two_steps, state_matches

    x, w, y = data()
    small = {"fwd": FWD_CONFIGS[-1], "bwd": BWD_CONFIGS[-1]}
    for name in NEW_MARGINS:
        want, state = spec_two_steps(name, x, w, y)
        for save in (False, True) if name == "curricularface" else (False,):
            head = MarginHead(w.shape[0], w.shape[1], name, impl="fused")
            head._engines["fused"] = FusedEngine(configs=small, chunk=64, save_logits=save)
            got = head_two_steps(head, x, w, y, torch.float32)
            errs = [rel_err(a, b) for g, e in zip(got, want) for a, b in zip(g, e)]
            print(f"fused {name} save_logits={save}: max relative error vs float64 {max(errs):.1e}")
            assert max(errs) < 1e-5, (name, save, errs)
            assert state_matches(head, state, 1e-6), (name, state, dict(head.named_buffers()))


def _subcenter_heads(K: int, name: str, **engine):
    """A float64 reference head and a fused head (engine options `engine`) with K sub-centers."""
    from heads import MarginHead
    from heads.fused import BWD_CONFIGS, FWD_CONFIGS, FusedEngine

    C, D = 70, 40
    ref = MarginHead(C, D, name, impl="reference", subcenters=K).double()
    fused = MarginHead(C, D, name, impl="fused", subcenters=K)
    pinned = (
        {} if engine.get("deterministic") else {"configs": {"fwd": FWD_CONFIGS[-1], "bwd": BWD_CONFIGS[-1]}}
    )
    fused._engines["fused"] = FusedEngine(chunk=32, subcenters=K, **{**pinned, **engine})
    return ref, fused


def _subcenters_match_float64(K: int) -> None:
    """Sub-center heads (K rows a class, the class cosine their max): fused against the float64
    reference over two training steps (the running state moves): ArcFace, CosFace and CurricularFace
    (its HARD=2 branch and state), the backward recomputing the cosines and reading the saved ones
    (with each class's argmax row), and deterministic mode (its own configs, bitwise repeatable);
    70 classes in chunks of 32: three chunks, a label in the last."""
    import torch

    from tests._margins_spec import data, head_two_steps, rel_err

    x, _, y = data()
    w = torch.randn(70 * K, x.shape[1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for name in ("arcface", "cosface", "curricularface"):
        for engine in ({}, {"save_logits": True}, {"deterministic": True}):
            ref, fused = _subcenter_heads(K, name, **engine)
            want, got = head_two_steps(ref, x, w, y), head_two_steps(fused, x, w, y, torch.float32)
            errs = [rel_err(a, b) for g, e in zip(got, want) for a, b in zip(g, e)]
            print(f"fused K={K} {name} {engine}: max relative error vs float64 {max(errs):.1e}")
            assert max(errs) < 1e-5, (K, name, engine, errs)
            for (key, a), (_, b) in zip(fused.named_buffers(), ref.named_buffers()):
                assert abs(a.item() - b.item()) <= 1e-6 * abs(b.item()), (K, name, key)
            if engine.get("deterministic"):
                again = head_two_steps(_subcenter_heads(K, name, **engine)[1], x, w, y, torch.float32)
                assert all(torch.equal(a, b) for g, e in zip(again, got) for a, b in zip(g, e)), "not bitwise"


def case_subcenters_2_match_float64_over_two_steps() -> None:
    _subcenters_match_float64(2)


def case_subcenters_3_match_float64_over_two_steps() -> None:
    _subcenters_match_float64(3)


def case_subcenters_route_the_gradient_to_one_row_and_break_ties_as_chunked() -> None:
    """Each class's gradient reaches its argmax row alone; on exact ties (a class whose two rows are
    equal) the first, as the chunked engine (torch's max) does, so the engines agree; dc_y goes to
    the row c_y came from (heads.core.target_cosines), which the exact target terms also use."""
    import torch

    import heads.fused as fused_mod
    from heads import MarginHead
    from tests._margins_spec import data, rel_err

    K, C = 2, 70
    x, _, y = data()
    w = torch.randn(C * K, x.shape[1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    w[1::K][: C // 2] = w[0::K][: C // 2]  # the first half of the classes: two equal rows
    seen = []
    fix = fused_mod.fix_target_terms

    def spy(xn, xo, weight, rw, rows, *args, **kwargs):
        seen.append(rows.clone())
        return fix(xn, xo, weight, rw, rows, *args, **kwargs)

    fused_mod.fix_target_terms = spy
    try:
        heads = {"chunked": MarginHead(C, x.shape[1], "cosface", impl="chunked", block=16, subcenters=K)}
        for save in (False, True):
            heads[f"fused save_logits={save}"] = _subcenter_heads(K, "cosface", save_logits=save)[1]
        for head in heads.values():
            with torch.no_grad():
                head.weight.copy_(w)
            head(x.float(), y).backward()
    finally:
        fused_mod.fix_target_terms = fix
    cands = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).t()
    assert torch.equal(seen[0], y * K + cands.view(len(y), C, K)[torch.arange(len(y)), y].argmax(1))
    assert torch.equal(seen[0], seen[1])
    chunked = heads["chunked"].weight.grad
    assert float(chunked[1::K][: C // 2].abs().max()) == 0.0  # tied classes: the second row gets nothing
    for name, head in heads.items():
        assert rel_err(head.weight.grad, chunked) < 1e-5, name
        assert torch.equal(head.weight.grad[1::K][: C // 2] == 0, chunked[1::K][: C // 2] == 0), name


def case_subcenters_fp16_operands_as_on_the_gpu() -> None:
    """K = 3 with the GPU's fp16 operands (and the saved fp16 cosines with their int8 argmax rows):
    error against float64 within the reference's own on fp16-rounded inputs plus the K = 1 margins
    of case_fp16_operands_as_on_the_gpu."""
    torch, build_margin, data, ref, fused, close = _setup()
    import torch.nn.functional as F

    from heads.core import head_rows
    from heads.fused import BWD_CONFIGS, FWD_CONFIGS, FusedEngine
    from heads.reference import reference_forward

    K = 3
    x, _, y = data(40, 90, 64, seed=6)
    w = torch.randn(90 * K, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    margin = build_margin("arcface", 0.5)

    def exact(xx, ww):
        xx, ww = xx.clone().requires_grad_(), ww.clone().requires_grad_()
        loss, _ = reference_forward(xx, ww, y, margin, 30.0, 1.0, subcenters=K)
        return (loss.detach(), *torch.autograd.grad(loss, [xx, ww]))

    want, rounded = exact(x, w), exact(x.half().double(), w.half().double())
    small = {"fwd": FWD_CONFIGS[-1], "bwd": BWD_CONFIGS[-1]}
    for save, tol in ((False, 1e-3), (True, 5e-3)):
        engine = FusedEngine(configs=small, chunk=64, operands="fp16", save_logits=save, subcenters=K)
        xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
        rows, _ = head_rows(F.normalize(xf, dim=1), wf, y, margin, 0, 30.0, 1.0, engine)
        loss = rows.mean()
        got = (loss.detach(), *torch.autograd.grad(loss, [xf, wf]))
        for part, a, r, e in zip(("loss", "dX", "dW"), got, rounded, want):
            scale = e.abs().max().item()
            err_got = (a.double() - e).abs().max().item() / scale
            err_ref = (r - e).abs().max().item() / scale
            assert err_got <= err_ref + tol, (save, part, err_got, err_ref)


CASES = cases_in(globals())


@pytest.mark.parametrize("case", CASES)
def test_fused_case(case: str, interpreter_results: dict[str, str]) -> None:
    assert case in interpreter_results, f"{case} did not run in the interpreter subprocess"
    assert interpreter_results[case] == "ok", interpreter_results[case]


if __name__ == "__main__":
    raise SystemExit(run_cases(globals()))
