"""Extension points of the training loop. The defaults do nothing; the crash and divergence tests
pass their own (tests/_trainer_faults.py) to inject non-finite losses, slow steps and a checkpoint
write that is cut short, so none of that lives in the loop itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from torch import nn


@dataclass(frozen=True)
class FinishedRun:
    """What `TrainerHooks.finished` is given: this process's part of a run whose steps have all run."""

    run_dir: Path
    rank: int
    step: int  # the last step run (the total)
    backbone_and_head: nn.Module  # the trained module, unwrapped: parameters named backbone.* and
    # head.* (this rank's rows of a sharded head)


class TrainerHooks:
    """Called by `trainer.engine.Trainer` at fixed points; subclass and override what you need."""

    def micro_batch_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch of optimizer step `step` (0-based), before backward."""
        return loss

    def after_backward(self, step: int) -> None:
        """All micro-batches of step `step` have run backward; the optimizer has not stepped."""

    def checkpoint_written(self, step: int, file: IO[bytes]) -> None:
        """The step checkpoint is in its temp file (open, not yet fsync'ed or renamed)."""

    def finished(self, run: FinishedRun) -> None:
        """Every step has run; the model is still alive (on every rank)."""
