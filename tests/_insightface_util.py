"""The InsightFace fixture's recipe, shared by tests/data/insightface/make_fixture.py (which ran
InsightFace's own code once) and tests/eval/test_import_insightface.py: fixture.pt stores each
architecture's state-dict layout (names, shapes, dtypes), not its tensors (an r18 alone is 96 MB);
both sides fill that layout with the same numbers from a seeded PCG64 stream, whose raw 64-bit
output NumPy keeps fixed across versions, so the test rebuilds the exact weights the embeddings were
computed with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FIXTURE = Path(__file__).resolve().parent / "data" / "insightface" / "fixture.pt"
INPUT_SHAPE = (2, 3, 112, 112)

Layout = list[tuple[str, list[int], str]]


def _uniform(bits: np.random.PCG64, shape: list[int], low: float, high: float) -> torch.Tensor:
    n = int(np.prod(shape)) if shape else 1
    unit = (bits.random_raw(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1), 53 bits
    return torch.from_numpy((low + (high - low) * unit).astype(np.float32)).reshape(shape)


def _fill(name: str, shape: list[int], bits: np.random.PCG64) -> torch.Tensor:
    """Plausible trained-model numbers: BatchNorm statistics far from the identity (so a lost or
    misplaced one changes the embedding), fan-in scaled weights (activations stay finite)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_mean":
        return _uniform(bits, shape, -0.3, 0.3)
    if leaf == "running_var":
        return _uniform(bits, shape, 0.5, 2.0)
    if leaf == "bias":
        return _uniform(bits, shape, -0.1, 0.1)
    if len(shape) == 1:  # a BatchNorm scale or a PReLU slope
        return _uniform(bits, shape, 0.5, 1.5)
    bound = (1.0 / int(np.prod(shape[1:]))) ** 0.5  # variance 1/(3 fan-in): deep nets stay in range
    return _uniform(bits, shape, -bound, bound)


def their_state(layout: Layout, seed: int) -> dict[str, torch.Tensor]:
    """The state dict in InsightFace's layout with the fixture's numbers. Their IResNet's `features`
    BatchNorm keeps the scale 1.0 they fix (requires_grad False); its statistics are filled."""
    bits = np.random.PCG64(seed)
    state = {}
    for name, shape, dtype in layout:
        if dtype == "torch.int64":  # num_batches_tracked: unused in eval
            state[name] = torch.tensor(1000, dtype=torch.int64)
        elif name == "features.weight":
            state[name] = torch.ones(shape)
        else:
            state[name] = _fill(name, shape, bits)
    return state


def fixed_input(seed: int) -> torch.Tensor:
    """The images (normalized to [-1, 1], as both projects feed) the stored embeddings are of."""
    return _uniform(np.random.PCG64(seed + 1), list(INPUT_SHAPE), -1.0, 1.0)
