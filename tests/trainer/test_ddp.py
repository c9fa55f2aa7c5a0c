"""Two processes under torchrun on the CPU (gloo): after training, both ranks hold identical
parameters (DDP averaged the gradients and every rank stepped the same way), but for the sharded
head (head.parallel=shard, the default on 2 ranks), whose classes are split between them. BN running
statistics are buffers, not parameters: DDP broadcasts rank 0's at each forward, and rank 0 alone
saves them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests._trainer_util import ROOT, env, main_command, metrics, teacher_file, tiny_overrides


@pytest.mark.slow
@pytest.mark.parametrize("distill", [False, True], ids=["alone", "distilled"])
def test_torchrun_two_ranks_keep_parameters_identical(tmp_path, distill):
    """Slow: torchrun starts two Python processes and a gloo rendezvous (~10 s on 2 cores).
    Distilled: each rank runs its own copy of the teacher, whose term DDP averages like the rest."""
    run = tmp_path / "run"
    extra = {"distill.teacher": teacher_file(tmp_path / "teacher.pt")} if distill else {}
    args = tiny_overrides(run, steps=6, **{"optim.accumulate": 2, "optim.clip_grad_norm": 5.0}, **extra)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*torchrun, *main_command({"dump_params": True}), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # rank 0 alone prints it
    assert summary["step"] == 6
    assert "2 process(es)" in proc.stderr and "global batch 64" in proc.stderr
    a = torch.load(run / "params-rank0.pt", weights_only=True)
    b = torch.load(run / "params-rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        if key == "head.weight":  # head.parallel=shard (the default on 2 ranks): 4 of the 8 classes each
            assert a[key].shape == b[key].shape == (4, 32) and not torch.equal(a[key], b[key])
            continue
        assert torch.equal(a[key], b[key]), key
    rows = metrics(run)
    assert len(rows) == 6  # only rank 0 logs
    assert all(0 < r["distill_loss"] < 2 for r in rows) if distill else "distill_loss" not in rows[-1]
