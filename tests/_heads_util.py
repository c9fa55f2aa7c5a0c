"""Shared by the head tests (CPU and CUDA): the margins every implementation is checked on, and data."""

from __future__ import annotations

import pytest
import torch

from heads.core import GRAD_DTYPE_SUPPORTED

# Parameter.grad_dtype (torch >= 2.10): a bf16 gradient of the fp32 head weight (head.grad_dtype)
needs_grad_dtype = pytest.mark.skipif(
    not GRAD_DTYPE_SUPPORTED,
    reason=f"needs torch >= 2.10 (Parameter.grad_dtype); this is torch {torch.__version__}",
)

MARGINS = [
    ("cosface", {}),
    ("arcface", {}),
    ("sphereface", {"m": 1}),
    ("sphereface", {"m": 2}),
    ("sphereface", {"m": 3}),
    ("sphereface", {"m": 4, "lambda_min": 0.0}),
    ("combined", {"m1": 1.0, "m2": 0.3, "m3": 0.2}),
    ("combined", {"m1": 0.9, "m2": 0.4, "m3": 0.15}),
]


def make_data(B: int, C: int, D: int, seed: int = 0):
    """float64 embeddings, class centres and labels, with one label in the last (partial) tile."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    y[-1] = C - 1
    return x, w, y
