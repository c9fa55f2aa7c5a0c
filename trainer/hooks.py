"""Extension points of the training loop. The defaults do nothing; the crash and divergence tests
pass their own (tests/_trainer_faults.py) to inject non-finite losses, slow steps and a checkpoint
write that is cut short, so none of that lives in the loop itself."""

from __future__ import annotations

from typing import IO, TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: the engine imports this module
    from trainer.engine import Trainer


class TrainerHooks:
    """Called by `trainer.engine.Trainer` at fixed points; subclass and override what you need."""

    def micro_batch_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch of optimizer step `step` (0-based), before backward."""
        return loss

    def after_backward(self, step: int) -> None:
        """All micro-batches of step `step` have run backward; the optimizer has not stepped."""

    def checkpoint_written(self, step: int, file: IO[bytes]) -> None:
        """The step checkpoint is in its temp file (open, not yet fsync'ed or renamed)."""

    def finished(self, trainer: Trainer) -> None:
        """Every step has run; the model is still alive (on every rank)."""
