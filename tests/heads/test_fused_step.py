"""The head's fused SGD step (heads/fused_step.py, heads/head_sgd.py's FusedHeadSGD) under
TRITON_INTERPRET=1 against torch.optim.SGD, and where it hands over to torch's step.

Tolerance: the kernel makes torch's operations in torch's order, each "a + alpha b" one fused
multiply-add as torch's CPU and CUDA kernels make it, and the interpreter's tl.fma is a true fma, so
the weights and momentum come out equal to torch's bit for bit here; the cases allow 2 units in the
last place of the largest element (a CPU whose torch kernels do not fuse would round differently, by
at most one unit per operation). Wn and the inverse norms are the normalize pass's, bit for bit
(the same row operations on the same fp32 W). The cases run in one interpreter subprocess
(tests/_interpreter.py); the plain-torch checks below them run in this process.
"""

from __future__ import annotations

import pytest
import torch

from heads import MarginHead
from heads.head_sgd import FusedHeadSGD
from tests._heads_util import needs_grad_dtype
from tests._interpreter import cases_in, run_cases
from tests._interpreter import interpreter_results as run_in_interpreter

OPTIONS = (
    {"momentum": 0.9, "weight_decay": 5e-4},  # the trainer's defaults
    {"momentum": 0.9, "weight_decay": 1e-3, "nesterov": True},
    {"momentum": 0.5, "dampening": 0.3},
    {},  # plain SGD: no momentum state
)


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    return run_in_interpreter("tests.heads.test_fused_step")


# ---- the cases (run only in the subprocess) --------------------------------------------------


def _fused_head(C: int = 70, D: int = 40, seed: int = 0):
    from heads.fused import BWD_CONFIGS, FWD_CONFIGS, FusedEngine

    torch.manual_seed(seed)
    head = MarginHead(C, D, "arcface", impl="fused", seed=seed)
    head._engines["fused"] = FusedEngine(configs={"fwd": FWD_CONFIGS[-1], "bwd": BWD_CONFIGS[-1]}, chunk=64)
    return head


def _within_2_ulp(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    same = (got == want).float().mean().item()
    assert err <= 2 * 2.0**-24 * scale, f"{what}: error {err:.3g}, scale {scale:.3g}, {same:.1%} equal"


def _normalize_pass(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from heads.fused import FusedEngine

    fresh = FusedEngine()
    rw = fresh.inv_norms(weight)
    return rw, fresh._wn[2]


def case_fused_step_equals_torch_sgd_and_hands_over_wn() -> None:
    from heads.fused import _weight_key

    for options in OPTIONS:
        head = _fused_head()
        mirror = head.weight.detach().clone().requires_grad_()
        fused = FusedHeadSGD(head.parameters(), head=head, lr=0.3, **options)
        plain = torch.optim.SGD([mirror], lr=0.3, **options)
        engine = head.engine("fused")
        for step in range(3):
            head(torch.randn(16, 40), torch.randint(0, 70, (16,))).backward()
            mirror.grad = head.weight.grad.clone()
            kept = engine._wn[2]
            fused.step()
            plain.step()
            fused.zero_grad()
            plain.zero_grad()
            what = f"{options} step {step}"
            _within_2_ulp(head.weight.detach(), mirror.detach(), f"W, {what}")
            if options.get("momentum"):
                got = fused.state[head.weight]["momentum_buffer"]
                _within_2_ulp(got, plain.state[mirror]["momentum_buffer"], f"momentum, {what}")
            else:
                assert head.weight not in fused.state or not fused.state[head.weight], what
            # the step made the new version's Wn and 1/|w| (into the old Wn's buffer), as the normalize
            # pass would, and the next forward takes them as they are
            key, rw, wn = engine._wn
            assert key == _weight_key(head.weight, wn.dtype) and wn is kept, what
            want_rw, want_wn = _normalize_pass(head.weight)
            assert torch.equal(rw, want_rw) and torch.equal(wn, want_wn), what
            head(torch.randn(4, 40), torch.randint(0, 70, (4,)))
            assert engine._wn[2] is wn and engine._wn[1] is rw, f"the forward remade Wn, {what}"


def case_scaler_skip_and_clipping_as_the_trainer_runs_them() -> None:
    """The trainer's sequence (GradScaler scale, backward, unscale_, clip by the global norm, scaler
    step, update) with FusedHeadSGD equals it with torch.optim.SGD; a step whose gradient holds an
    inf is skipped by both (W, momentum and the engine's Wn untouched). FusedHeadSGD takes the clip's
    factor into its step (`defer_grad_scale`, as trainer/head_parallel.py hands it: the gradient is
    not touched before the step), torch's SGD gets the clip's in-place multiply."""
    from heads.fused import _weight_key

    head = _fused_head(seed=3)
    mirror = head.weight.detach().clone().requires_grad_()
    fused = FusedHeadSGD(head.parameters(), head=head, lr=0.2, momentum=0.9, weight_decay=5e-4)
    plain = torch.optim.SGD([mirror], lr=0.2, momentum=0.9, weight_decay=5e-4)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(2)]
    engine = head.engine("fused")
    for step in range(4):
        x, y = torch.randn(16, 40), torch.randint(0, 70, (16,))
        loss = head(x, y)
        scalers[1].scale(loss.detach())  # the same scale (both start and move alike); mirror copies dW
        scalers[0].scale(loss).backward()
        mirror.grad = head.weight.grad.clone()
        if step == 2:
            head.weight.grad[5, 7] = mirror.grad[5, 7] = float("inf")
        before = (head.weight.detach().clone(), engine._wn)
        for scaler, opt, p in zip(scalers, (fused, plain), (head.weight, mirror)):
            scaler.unscale_(opt)
            norm = torch.nn.utils.get_total_norm([p.grad])
            assert step == 2 or norm > 0.05, norm  # it clips
            if opt is fused:
                unscaled = p.grad.clone()
                assert opt.defer_grad_scale(p, torch.clamp(0.05 / (norm + 1e-6), max=1.0))
                assert torch.equal(p.grad, unscaled)
            else:
                torch.nn.utils.clip_grads_with_norm_([p], 0.05, norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        _within_2_ulp(head.weight.detach(), mirror.detach(), f"W, step {step}")
        _within_2_ulp(
            fused.state[head.weight]["momentum_buffer"], plain.state[mirror]["momentum_buffer"], f"m {step}"
        )
        if step == 2:
            assert torch.equal(head.weight.detach(), before[0]), "the inf step moved W"
            assert engine._wn is before[1], "the skipped step replaced Wn"
        else:
            assert engine._wn[0] == _weight_key(head.weight, torch.float32), "not the fused step"
    assert scalers[0].get_scale() == scalers[1].get_scale() < 1024.0


def case_fused_step_reads_a_bf16_gradient() -> None:
    """head.grad_dtype=bfloat16: the backward writes a bf16 weight.grad and the fused step reads it
    (the kernel widens each element as it reads), with the clip's deferred factor on one step: torch's
    SGD over grad.float() (times the factor), the momentum fp32; the gradient left as it came."""
    from heads.fused import _weight_key

    for options in OPTIONS:
        head = _fused_head(seed=7)
        head.weight.grad_dtype = torch.bfloat16
        mirror = head.weight.detach().clone().requires_grad_()
        fused = FusedHeadSGD(head.parameters(), head=head, lr=0.3, **options)
        plain = torch.optim.SGD([mirror], lr=0.3, **options)
        for step in range(3):
            head(torch.randn(16, 40), torch.randint(0, 70, (16,))).backward()
            grad = head.weight.grad
            assert grad.dtype == torch.bfloat16, grad.dtype
            kept = grad.clone()
            mirror.grad = grad.float()
            if step == 1:
                factor = torch.tensor(0.37)
                assert fused.defer_grad_scale(head.weight, factor)
                mirror.grad.mul_(factor)
            fused.step()
            plain.step()
            assert head.weight.grad is grad and torch.equal(grad, kept), "the step changed the gradient"
            what = f"{options} step {step}"
            assert head.engine("fused")._wn[0] == _weight_key(head.weight, torch.float32), (
                f"not fused, {what}"
            )
            fused.zero_grad()
            plain.zero_grad()
            _within_2_ulp(head.weight.detach(), mirror.detach(), f"W, {what}")
            if options.get("momentum"):
                got = fused.state[head.weight]["momentum_buffer"]
                assert got.dtype == torch.float32, what
                _within_2_ulp(got, plain.state[mirror]["momentum_buffer"], f"momentum, {what}")


def case_fused_step_and_the_deferred_clip_make_no_host_sync() -> None:
    """The step's selection, its launch, the engine's handover and the deferred clip factor run
    under tests/heads/test_host_syncs.py's NoHostSync (no .item(), no truth value of a tensor)."""
    from tests.heads.test_host_syncs import NoHostSync

    head = _fused_head(seed=5)
    opt = FusedHeadSGD(head.parameters(), head=head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        head(torch.randn(8, 40), torch.randint(0, 70, (8,))).backward()
        with NoHostSync():
            norm = torch.nn.utils.get_total_norm([head.weight.grad])
            assert opt.defer_grad_scale(head.weight, torch.clamp(0.01 / (norm + 1e-6), max=1.0))
            opt.step()
            opt.zero_grad()
    assert head.engine("fused")._wn[0][1] == head.weight._version


CASES = cases_in(globals())


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=needs_grad_dtype) if "bf16" in c else c for c in CASES]
)
def test_fused_step_case(case: str, interpreter_results: dict[str, str]) -> None:
    assert case in interpreter_results, f"{case} did not run in the interpreter subprocess"
    assert interpreter_results[case] == "ok", interpreter_results[case]


# ---- where torch's step runs (this process: no Triton launch) ----------------------------------


def test_torch_steps_whatever_the_fused_step_does_not_apply_to() -> None:
    """The chunked engine's head, the backbone's parameters, Partial FC's stand-in parameter: torch's
    step, bit for bit; fused=True (torch's own fused SGD) is refused in one line."""
    head = MarginHead(30, 8, "cosface", impl="chunked")
    other = torch.nn.Linear(8, 4)
    params = [*head.parameters(), *other.parameters()]
    mirror = [p.detach().clone().requires_grad_() for p in params]
    ours = FusedHeadSGD(params, head=head, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(mirror, lr=0.1, momentum=0.9)
    for _ in range(2):
        x, y = torch.randn(6, 8), torch.randint(0, 30, (6,))
        (head(x, y) + other(x).square().mean()).backward()
        for m, p in zip(mirror, params):
            m.grad = p.grad.clone()
        ours.step()
        ref.step()
        ours.zero_grad()
        ref.zero_grad()
    for m, p in zip(mirror, params):
        assert torch.equal(m, p.detach())
    fused_head = MarginHead(30, 8, "cosface", impl="fused")
    fused_head.weight.grad = torch.ones_like(fused_head.weight)
    opt = FusedHeadSGD(fused_head.parameters(), head=fused_head, lr=0.1, momentum=0.9)
    stand_in = torch.nn.Parameter(fused_head.weight.detach()[:4].clone())  # heads.sharded.sampled_rows'
    stand_in.grad = torch.ones_like(stand_in)
    assert opt._fused_engine(opt.param_groups[0], stand_in) is None
    assert opt._fused_engine(opt.param_groups[0], fused_head.weight) is not None
    with pytest.raises(ValueError, match="fused=True"):
        FusedHeadSGD(head.parameters(), head=head, lr=0.1, fused=True)


@needs_grad_dtype
def test_torch_steps_a_bf16_gradient_as_the_weights_fp32() -> None:
    """The chunked engine's head with a bf16 weight.grad (head.grad_dtype), through GradScaler's
    unscale as the trainer runs it: torch's step over the gradient's fp32 values, bit for bit, with
    an fp32 momentum (torch's SGD handed the bf16 gradient makes a bf16 one); the gradient and the
    weight's grad_dtype are put back as they came."""
    head = MarginHead(30, 8, "cosface", impl="chunked", seed=2)
    head.weight.grad_dtype = torch.bfloat16
    mirror = head.weight.detach().clone().requires_grad_()
    ours = FusedHeadSGD(head.parameters(), head=head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    ref = torch.optim.SGD([mirror], lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for _ in range(3):
        scaler.scale(head(torch.randn(6, 8), torch.randint(0, 30, (6,)))).backward()
        scaler.unscale_(ours)
        grad = head.weight.grad
        assert grad.dtype == torch.bfloat16, grad.dtype
        mirror.grad = grad.float()
        scaler.step(ours)
        scaler.update()
        ref.step()
        assert head.weight.grad is grad and head.weight.grad_dtype == torch.bfloat16
        ours.zero_grad()
        ref.zero_grad()
    assert torch.equal(head.weight.detach(), mirror.detach())
    buf = ours.state[head.weight]["momentum_buffer"]
    assert buf.dtype == torch.float32 and torch.equal(buf, ref.state[mirror]["momentum_buffer"])


if __name__ == "__main__":
    raise SystemExit(run_cases(globals()))
