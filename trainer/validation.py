"""What the training loop needs from a validator. The trainer never imports an evaluator: its
command module (trainer/main.py) builds them (eval/verification/validation.py) and hands them in."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class Validator(Protocol):
    """Scores the embedding network. Runs on rank 0 only, between optimizer steps.

    The first validator's "accuracy_mean" drives `best.pt`; each validator's metrics are logged
    to metrics.jsonl (the first one's keys as they come, the others' prefixed with their name).
    """

    name: str

    def __call__(self, model: nn.Module) -> dict[str, float]:
        """Metrics of `model` (the bare backbone, on its training device, in fp32 whatever the run's
        autocast dtype, as an evaluator would run the checkpoint); must leave its mode as found."""
        ...
