"""trainer/distributed.py: a two-rank torchrun job on the CPU never hangs when one rank fails or stalls.

Before: the failing rank sat in the teardown's barrier while the other waited in DDP's all-reduce,
silently, until gloo's 30-minute timeout.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from shards.manifest import load_manifest
from shards.sample_index import build_sample_table, epoch_order
from tests._damage import corrupt_tar_header
from tests._loader_util import make_shards
from tests._trainer_util import ROOT, env, main_command, tiny_overrides

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _torchrun(args: list[str], faults: dict | None = None, timeout: float = 120):
    start = time.monotonic()
    proc = subprocess.run(
        [*TORCHRUN, *main_command(faults), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        cwd=ROOT,
    )
    return proc, time.monotonic() - start


def _rank_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_bad_sample_on_one_rank_stops_the_job(tmp_path):
    """Slow: one torchrun launch (two processes, gloo rendezvous), ~10 s on 2 cores."""
    shards = make_shards(tmp_path / "shards", [32, 32])
    table = build_sample_table(load_manifest(shards), want_keys=True)
    order = epoch_order(len(table), batch_size=4, rank=1, world_size=2, seed=0, epoch=0)
    bad = int(order[2 * 4])  # the first sample of rank 1's third batch; rank 0 never reads it
    corrupt_tar_header(table.shard_paths[table.shard[bad]], table.keys[bad])
    args = tiny_overrides(
        tmp_path / "run",
        steps=8,
        **{
            "data.source": "shards",
            "data.train_shards": str(shards),
            "loader.batch_size": 4,
            "loader.workers": 0,
            "loader.backend": "torch",
            "checkpoint.every_steps": 1,
        },
    )
    proc, seconds = _torchrun(args)
    assert proc.returncode != 0 and seconds < 60, (seconds, proc.stderr[-3000:])
    lines = _rank_errors(proc.stderr)
    assert any(f"sample {bad}: corrupt shard" in line for line in lines), proc.stderr[-3000:]
    assert all("Traceback" not in line for line in lines)


@pytest.mark.slow
def test_a_stalled_rank_times_out_the_others(tmp_path):
    """Slow: one torchrun launch; rank 1 stops answering, rank 0 gives up after
    run.collective_timeout_s=5 with one line and torchrun stops rank 1 (~15 s on 2 cores)."""
    args = tiny_overrides(tmp_path / "run", steps=8, **{"run.collective_timeout_s": 5})
    proc, seconds = _torchrun(args, faults={"hang_rank": 1, "hang_step": 2})
    assert proc.returncode != 0 and seconds < 60, (seconds, proc.stderr[-3000:])
    lines = _rank_errors(proc.stderr)
    assert any(line.startswith("error: rank 0 stops: a collective failed") for line in lines), proc.stderr[
        -3000:
    ]


@pytest.mark.slow
def test_checkpoint_write_failing_on_rank_0_stops_the_job(tmp_path):
    """Slow: one torchrun launch (~10 s on 2 cores). Rank 0 alone writes checkpoints; its disk is
    "full" (RLIMIT_FSIZE, SIGXFSZ ignored), so rank 0 stops with its line while rank 1 is already in
    the next step's collectives."""
    import resource
    import signal

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000, 2_000))

    args = tiny_overrides(tmp_path / "run", steps=8, **{"checkpoint.every_steps": 2})
    start = time.monotonic()
    proc = subprocess.run(
        [*TORCHRUN, *main_command(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
        cwd=ROOT,
        preexec_fn=limit_files,
    )
    seconds = time.monotonic() - start
    assert proc.returncode != 0 and seconds < 60, (seconds, proc.stderr[-3000:])
    lines = _rank_errors(proc.stderr)
    assert any("cannot write the checkpoint" in line for line in lines), proc.stderr[-3000:]
