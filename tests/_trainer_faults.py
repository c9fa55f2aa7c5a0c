"""Fault injection for the trainer tests: a `TrainerHooks` that makes chosen steps' losses
non-finite, slows steps down, holds a half-written checkpoint, and dumps each rank's parameters.

In-process tests pass `FaultHooks(...)` to `trainer.engine.train` / `trainer.main.main`. Subprocess
tests run this file in place of trainer/main.py (also under torchrun):

    python -m tests._trainer_faults '{"step_sleep_s": 0.15}' [trainer/main.py arguments ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from trainer.hooks import FinishedRun, TrainerHooks

SCRIPT = Path(__file__).resolve()


@dataclass
class FaultHooks(TrainerHooks):
    nonfinite_steps: list[int] = field(default_factory=list)  # make the loss at these steps inf
    step_sleep_s: float = 0.0  # slow each step down (crash test)
    checkpoint_pause_s: float = 0.0  # hold a half-written checkpoint this long (crash test) ...
    checkpoint_pause_step: int = 0  # ... when writing this step's checkpoint (0 = every one)
    dump_params: bool = False  # every rank writes its final parameters (DDP test)
    hang_rank: int = -1  # this rank (RANK) stops answering ...
    hang_step: int = -1  # ... after the backward of this step (hang test)

    def micro_batch_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("inf") if step in self.nonfinite_steps else loss

    def after_backward(self, step: int) -> None:
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)
        if step == self.hang_step and int(os.environ.get("RANK", "0")) == self.hang_rank:
            time.sleep(3600)

    def checkpoint_written(self, step: int, file: IO[bytes]) -> None:
        if self.checkpoint_pause_s <= 0 or self.checkpoint_pause_step not in (0, step):
            return
        file.flush()
        data = Path(file.name).read_bytes()
        file.truncate(max(1, len(data) // 2))  # looks exactly like a write cut short
        file.flush()
        time.sleep(self.checkpoint_pause_s)
        file.seek(0)
        file.write(data)

    def finished(self, run: FinishedRun) -> None:
        if self.dump_params:
            flat = {k: v.detach().cpu() for k, v in run.backbone_and_head.named_parameters()}
            torch.save(flat, run.run_dir / f"params-rank{run.rank}.pt")


if __name__ == "__main__":
    from trainer.main import main

    raise SystemExit(main(sys.argv[2:], hooks=FaultHooks(**json.loads(sys.argv[1]))))
