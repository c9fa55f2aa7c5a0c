"""The heads' training step makes no host sync (a GPU-only cost CPU timings cannot show), checked
structurally on the CPU: the chunked engine and the sharded head's Partial FC sampling run forward
and backward under a torch function mode that fails on every op that makes the host wait for the
device (`.item()`, `.tolist()`, truth values, nonzero, unique, masked_select, boolean-mask indexing).
With the earlier boolean-mask target column the chunked engine synced ~615 times per step at C = 1M
(block 8192); with `.unique()` Partial FC synced on every forward."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import heads.core
import heads.sharded
from heads import MarginHead
from heads.sharded import ShardedMarginHead, sample_classes, sampled_rows

# ops whose result the host must read (or whose output size depends on the data)
SYNCING = {
    "item",
    "tolist",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "nonzero",
    "argwhere",
    "unique",
    "unique_consecutive",
    "_unique2",
    "masked_select",
    "masked_scatter",
}


def _syncing_index(index) -> bool:
    """A boolean mask (its count sizes the result), or a 0-d integer tensor (read as a Python int)."""
    parts = index if isinstance(index, tuple) else (index,)
    tensors = [p for p in parts if isinstance(p, torch.Tensor)]
    return any(p.dtype == torch.bool or (p.dim() == 0 and not p.is_floating_point()) for p in tensors)


class HostSyncError(AssertionError):
    pass


class NoHostSync(TorchFunctionMode):
    """Raises HostSyncError on any op that would wait for the device (on CUDA) to learn a value."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            raise HostSyncError(f"host sync: {name}")
        if name in ("__getitem__", "__setitem__", "index_put", "index_put_") and _syncing_index(args[1]):
            raise HostSyncError(f"host sync: {name} with a boolean mask or a 0-d index tensor")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def checked_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The heads' custom backward (margin derivative, engine sweep, target-term fix) under NoHostSync
    too: autograd runs backward functions outside the caller's torch function mode."""
    plain = heads.core.backward_through_engine

    def under_mode(ctx, g):
        with NoHostSync():
            return plain(ctx, g)

    for module in (heads.core, heads.sharded):
        monkeypatch.setattr(module, "backward_through_engine", under_mode)


def test_the_detector_catches_each_kind_of_sync() -> None:
    x = torch.randn(6)
    mask = x > 0
    for op in (
        lambda: x[mask],
        lambda: x.__setitem__(mask, 0.0),
        lambda: x[torch.argmax(x)],
        lambda: x.unique(),
        lambda: mask.nonzero(),
        lambda: x.sum().item(),
        lambda: x.tolist(),
        lambda: bool(mask.any()),
        lambda: torch.masked_select(x, mask),
    ):
        with NoHostSync(), pytest.raises(HostSyncError):
            op()
    with NoHostSync():  # what the heads use instead
        torch.where(mask, x, torch.zeros_like(x)).scatter_(0, torch.tensor([1]), 2.0)[torch.tensor([0, 2])]


SV = {"margin": "arcface", "t": 1.1}


# bf16: the low-precision target-term fix too; the margins after ArcFace: their running state too
@pytest.mark.parametrize(
    "operands, margin",
    [
        ("auto", SV),
        ("bf16", SV),
        ("auto", {"margin": "adaface"}),
        ("auto", {"margin": "magface"}),
        ("auto", {"margin": "curricularface"}),
    ],
)
def test_chunked_engine_step_has_no_host_sync(operands: str, margin: dict, checked_backward: None) -> None:
    C, D, B = 50, 8, 12
    head = MarginHead(C, D, **margin, impl="chunked", block=16, operands=operands)
    x = torch.randn(B, D, requires_grad=True)
    y = torch.tensor([0, 15, 16, 31, 32, 47, 48, 49, 3, 3, 20, 49])  # block edges, repeats, the last class
    with NoHostSync():
        loss = head(x, y)
        loss.backward()
    assert torch.isfinite(loss) and head.weight.grad is not None and x.grad is not None


def test_partial_fc_sampling_and_sparse_step_have_no_host_sync(checked_backward: None) -> None:
    head = ShardedMarginHead(200, 8, margin="cosface", impl="chunked", block=32, sample_rate=0.1)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, foreach=False)
    head.set_step(1)
    with NoHostSync():
        for _ in range(2):  # two micro-batches: the step's sample is their union
            head(torch.randn(8, 8), torch.randint(0, 200, (8,))).backward()
        with sampled_rows(opt, head.weight, head.sampled):
            opt.step()
    assert head.sampled is not None and len(head.sampled) == 2 * 20


def test_sample_size_is_fixed_by_shapes_and_keeps_every_positive() -> None:
    """The draw's size depends on shapes only: int(rate x C_local), raised to the batch's row count
    when that is larger (all positives must fit); labels outside [0, C_local) are not positives."""
    g = torch.Generator().manual_seed(0)
    few = torch.tensor([5, -1, 5, 120])  # -1 and 120: classes of other ranks
    idx = sample_classes(few, 100, 0.1, g)
    assert idx is not None and len(idx) == 10 and 5 in idx.tolist() and len(set(idx.tolist())) == 10
    many = torch.tensor([1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])  # 16 rows, 15 classes
    idx = sample_classes(many, 100, 0.1, g)
    assert len(idx) == 16 and set(many.tolist()) < set(idx.tolist())
    assert len(sample_classes(torch.arange(30), 20, 0.1, g)) == 20, "never more than the rank's classes"
