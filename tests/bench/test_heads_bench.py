"""bench/heads.py's head options: --grad-dtype (torch's weight.grad_dtype on every head, passed to
the CPU child processes, recorded in every row, dW counted at its own element size) and
--save-logits (the fused head's save_logits, recorded per row). The CPU run against the reference
is tests/heads/test_margin_head.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import heads.core
from bench import heads as bench_heads

REPO = Path(__file__).resolve().parents[2]


def _args(*argv: str):
    return bench_heads._resolve(bench_heads._parser().parse_args(["--device", "cpu", *argv]))


def test_a_cpu_run_with_a_bf16_weight_gradient_records_it_in_every_row():
    """One child process (chunked, no sub-center row): ~5-10 s on 2 cores, most of it importing torch."""
    cmd = [sys.executable, "-m", "bench.heads", "--device", "cpu", "--classes", "2000", "--batch", "32"]
    cmd += ["--dim", "64", "--impls", "chunked", "--margins", "cosface", "--subcenters", "1"]
    cmd += ["--repeats", "1", "--warmup", "0", "--grad-dtype", "bf16"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["grad_dtype"] == "bf16" and out["save_logits"] is False
    (row,) = out["rows"]
    # the child made the head: its row says bf16, so the flag reached it
    assert row["impl"] == "chunked" and row["grad_dtype"] == "bf16" and row["save_logits"] is False
    assert row["total_ms"] > 0 and "dW in bf16" in proc.stdout


def test_the_head_gets_the_options_and_dw_counts_at_its_own_size():
    B, D, C = 8, 16, 300
    shape = ["--classes", str(C), "--batch", str(B), "--dim", str(D), "--margins", "cosface"]
    for grad, dw_bytes in (("fp32", 4), ("bf16", 2)):
        args = _args(*shape, "--grad-dtype", grad)
        head, x, y = bench_heads._make(args, "chunked", C, "cosface", "cpu")
        head(x, y).backward()
        assert head.weight.grad.dtype == (torch.bfloat16 if grad == "bf16" else torch.float32)
        assert bench_heads._grad_bytes(head, x) == C * D * dw_bytes + B * D * 4
    # --save-logits is the fused head's: its head keeps the cosines, the others' rows say False
    args = _args(*shape)
    args.save_logits = True  # as on CUDA (on the CPU the flag is refused: no fused rows)
    assert bench_heads._make(args, "fused", C, "cosface", "cpu")[0].options.save_logits is True
    assert bench_heads._make(args, "chunked", C, "cosface", "cpu")[0].options.save_logits is False
    assert bench_heads._row_key(args, "fused", C, "cosface", 1)["save_logits"] is True
    assert bench_heads._row_key(args, "chunked", C, "cosface", 1)["save_logits"] is False


def test_the_options_mistakes_are_one_line(monkeypatch, capsys):
    code = bench_heads.main(["--device", "cpu", "--impls", "chunked", "--save-logits"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--save-logits" in err[0] and "fused" in err[0]
    # a torch whose Parameter has no grad_dtype cannot keep a bf16 gradient of an fp32 weight
    monkeypatch.setattr(heads.core, "GRAD_DTYPE_SUPPORTED", False)
    code = bench_heads.main(["--device", "cpu", "--impls", "chunked", "--grad-dtype", "bf16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--grad-dtype bf16" in err[0] and "grad_dtype" in err[0]
