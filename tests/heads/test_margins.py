"""AdaFace, MagFace and CurricularFace (issue 24) in the reference and chunked engines against the
papers' formulas in float64 (tests/_margins_spec.py) over two training steps, so the running state
moves; the state's buffers (eval leaves them, state_dict carries them), the options' checks, and
Partial FC with each margin. The fused engine: tests/heads/test_fused.py; 2 ranks:
tests/heads/test_sharded.py; the trainer's checkpoint: tests/trainer/test_resume.py."""

from __future__ import annotations

import pytest
import torch

from heads import MarginHead
from heads.sharded import ShardedMarginHead
from tests._margins_spec import NEW_MARGINS, data, head_two_steps, rel_err, spec_two_steps, state_matches


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("name", NEW_MARGINS)
def test_margin_matches_its_formula_in_float64_over_two_steps(name: str, impl: str) -> None:
    x, w, y = data()
    want, state = spec_two_steps(name, x, w, y)
    head = MarginHead(w.shape[0], w.shape[1], name, impl=impl, block=16).double()
    got = head_two_steps(head, x, w, y)
    for step, (g, e) in enumerate(zip(got, want)):
        errs = [rel_err(a, b) for a, b in zip(g, e)]
        assert max(errs) < 1e-13, (name, impl, step, errs)
    assert state_matches(head, state, 1e-14), (name, state, dict(head.named_buffers()))


def test_curricularface_data_has_hard_negatives_and_easy_rows() -> None:
    """The formula test above exercises both of CurricularFace's non-target branches."""
    x, w, y = data()
    xn, wn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(w, dim=1)
    c = xn @ wn.t()
    ctm = torch.cos(torch.acos(c.gather(1, y[:, None])) + 0.5)
    hard = (c > ctm).sum(1) - 1
    assert (hard > 0).any() and (hard == 0).any()


@pytest.mark.parametrize("name", ["adaface", "curricularface"])
def test_state_moves_in_training_not_in_eval_and_travels_in_state_dict(name: str) -> None:
    x, w, y = data()
    head = MarginHead(w.shape[0], w.shape[1], name, impl="chunked").double()
    start = {k: v.clone() for k, v in head.named_buffers()}
    assert start, "the running state is a buffer"
    head.eval()
    eval_loss = head(x, y)
    assert all(torch.equal(v, start[k]) for k, v in head.named_buffers()), "eval leaves the statistics"
    head.train()
    assert head(x, y) != eval_loss  # trained from moved statistics
    moved = dict(head.named_buffers())
    assert all(not torch.equal(v, start[k]) for k, v in moved.items())
    again = MarginHead(w.shape[0], w.shape[1], name, impl="chunked").double()
    again.load_state_dict(head.state_dict())
    assert all(torch.equal(v, moved[k]) for k, v in again.named_buffers())
    assert head(x, y) == again(x, y)  # resumed exactly: the next step too


def test_magface_pulls_norms_toward_its_optimum() -> None:
    """The regularizer's gradient at a small norm points outward (g'(a) = 1/u_a^2 - 1/a^2 < 0)."""
    x, w, y = data()
    head = MarginHead(w.shape[0], w.shape[1], "magface", impl="chunked", lambda_g=35.0, s=1e-6).double()
    x = (x / x.norm(dim=1, keepdim=True) * 12.0).requires_grad_()
    head(x, y).backward()
    assert ((x.grad * x).sum(1) < 0).all(), "descending the loss makes every norm grow"


def test_options_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="magface needs 0 < l_a < u_a"):
        MarginHead(10, 4, "magface", l_a=20.0, u_a=10.0)
    with pytest.raises(ValueError, match="SV-Softmax t=1.2 and curricularface both change the hard"):
        MarginHead(10, 4, "curricularface", t=1.2)
    with pytest.raises(ValueError, match=r"margin adaface does not take l_a \(its options: h, t_alpha\)"):
        MarginHead(10, 4, "adaface", l_a=1.0)


@pytest.mark.parametrize("name", NEW_MARGINS)
def test_partial_fc_with_each_margin_is_the_head_over_the_sampled_classes(name: str) -> None:
    x, w, y = data(B=24, C=300)
    C, D = w.shape
    sh = ShardedMarginHead(C, D, name, impl="chunked", block=32, sample_rate=0.2, seed=3).double()
    ref = None
    for step in range(2):
        with torch.no_grad():
            sh.weight.copy_(w)
        sh.set_step(step)
        xs = x * (1.0 + 0.4 * step)
        xx = xs.clone().requires_grad_()
        loss = sh(xx, y)
        (gx,) = torch.autograd.grad(loss, [xx])
        kept = sh.sampled
        if ref is None:
            ref = MarginHead(len(kept), D, name, impl="reference").double()
        with torch.no_grad():
            ref.weight.copy_(w[kept])
        xr = xs.clone().requires_grad_()
        ref_loss = ref(xr, torch.searchsorted(kept, y))
        (gxr,) = torch.autograd.grad(ref_loss, [xr])
        assert rel_err(loss.detach(), ref_loss.detach()) < 1e-13 and rel_err(gx, gxr) < 1e-12, (name, step)
        for (k, a), (_, b) in zip(sh.named_buffers(), ref.named_buffers()):
            assert a.item() == pytest.approx(b.item(), rel=1e-14), (name, k)  # c_y summed in another order


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("name", ["arcface", "curricularface", "magface"])
def test_subcenters_match_their_formula_in_float64_over_two_steps(name: str, impl: str) -> None:
    """Sub-center ArcFace (K = 3): the class cosine is the max of its 3 rows', the gradient goes to that
    row; with the plain margin and with margins that have state or per-row terms."""
    x, _, y = data()
    C, K = 70, 3
    w = torch.randn(C * K, x.shape[1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want, state = spec_two_steps(name, x, w, y, subcenters=K)
    head = MarginHead(C, x.shape[1], name, impl=impl, block=16, subcenters=K).double()
    assert head.weight.shape == (C * K, x.shape[1])
    got = head_two_steps(head, x, w, y)
    for step, (g, e) in enumerate(zip(got, want)):
        errs = [rel_err(a, b) for a, b in zip(g, e)]
        assert max(errs) < 1e-13, (name, impl, step, errs)
    assert state_matches(head, state, 1e-14)
    head(x[:1], y[:1]).backward()  # one embedding: one row of each class (its nearest) gets a gradient
    assert ((head.weight.grad.abs().sum(1) > 0).view(C, K).sum(1) == 1).all()


def test_dominant_subcenters_export_a_one_centre_head() -> None:
    C, K, D = 6, 3, 8
    head = MarginHead(C, D, "adaface", subcenters=K, impl="chunked", s=30.0)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(C).repeat(5)
    x = torch.randn(len(y), D, generator=g)
    pick = torch.tensor([2, 0, 1, 1, 0, 2])  # each class's embeddings gather around one sub-center
    x += (
        20.0
        * head.weight.detach()[y * K + pick[y]]
        / head.weight.detach()[y * K + pick[y]].norm(dim=1, keepdim=True)
    )
    head(x, y)  # moves the running state
    single = head.dominant_subcenters(x, y)
    assert single.subcenters == 1 and single.weight.shape == (C, D) and single.s == 30.0
    assert torch.equal(single.weight, head.weight.detach().view(C, K, D)[torch.arange(C), pick])
    assert torch.equal(single.margin_batch_mean, head.margin_batch_mean)
    assert torch.isfinite(single(x, y))


def test_subcenter_options_are_checked() -> None:
    with pytest.raises(ValueError, match="subcenters must be a positive integer, got 0"):
        MarginHead(10, 4, "arcface", subcenters=0)
    assert ShardedMarginHead(10, 4, "arcface", subcenters=2).weight.shape == (20, 4)  # whole classes
    assert MarginHead(10, 8, "arcface", subcenters=2).resolved_impl(torch.device("cuda")) == "fused"
    # the kernels read 16-byte rows: an embedding size not a multiple of 8 goes to the chunked engine
    assert MarginHead(10, 4, "arcface", subcenters=2).resolved_impl(torch.device("cuda")) == "chunked"
    assert MarginHead(10, 4, "arcface", subcenters=2, impl="fused").weight.shape == (20, 4)
