"""Crash safety: SIGKILL mid-training and mid-checkpoint-write, then `checkpoint.resume: auto`
continues from the last complete checkpoint and ends where an uninterrupted run ends.

On the CPU with one thread the continued run is bit-identical to the uninterrupted one (same data
order from the loader's position, same RNG states, deterministic kernels), and that is what these
tests assert (torch.equal, loss ==). (On GPUs cuDNN autotuning and atomics make a resumed run agree
only to float tolerance; these tests run on the CPU.)
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests._trainer_util import ROOT, backbone_state, env, main_command, metrics, run_main, tiny_overrides

STEPS = 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    proc = run_main(tiny_overrides(run, steps=STEPS))
    assert proc.returncode == 0, proc.stderr
    return run


def _start(args: list[str], faults: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *main_command(faults), *args],
        env=env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path_test, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path_test():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the kill point: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("kill point never reached")
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _assert_same_end(run: Path, reference: Path) -> None:
    proc = run_main(tiny_overrides(run, steps=STEPS))  # resume: auto is the default
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stderr
    last = metrics(run)[-1]
    ref = metrics(reference)[-1]
    assert last["step"] == ref["step"] == STEPS
    assert last["loss"] == ref["loss"]
    got = backbone_state(run / "checkpoints" / "last.pt")
    want = backbone_state(reference / "checkpoints" / "last.pt")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_sigkill_mid_training_then_resume(tmp_path, reference):
    run = tmp_path / "run"
    ckdir = run / "checkpoints"
    proc = _start(tiny_overrides(run, steps=STEPS), {"step_sleep_s": 0.15})
    # Kill between checkpoints: after step 4 is saved and at least one more step ran.
    _wait_for(lambda: (ckdir / "step-00000004.pt").is_file() and len(metrics(run)) >= 6, proc)
    _kill(proc)
    assert not (ckdir / "step-00000008.pt").exists()
    _assert_same_end(run, reference)


def test_sigkill_mid_checkpoint_write_then_resume(tmp_path, reference):
    run = tmp_path / "run"
    ckdir = run / "checkpoints"
    pause = {"checkpoint_pause_s": 60, "checkpoint_pause_step": 8}
    proc = _start(tiny_overrides(run, steps=STEPS), pause)
    _wait_for(lambda: (ckdir / "step-00000008.pt.tmp").is_file(), proc)
    time.sleep(0.2)  # inside the pause: the temp file holds half a checkpoint
    _kill(proc)
    assert (ckdir / "step-00000008.pt.tmp").is_file() and not (ckdir / "step-00000008.pt").exists()
    _assert_same_end(run, reference)
    assert not list(ckdir.glob("*.tmp"))  # the resumed run cleaned the partial file away


@pytest.mark.parametrize(
    "args",
    [
        {"head.margin": "adaface"},
        {"head.margin": "curricularface"},
        {"head.margin": "curricularface", "head.subcenters": 3},
    ],
)
def test_sigkill_then_resume_restores_the_margins_running_state(tmp_path, args):
    """The running state (AdaFace's norm statistics, CurricularFace's t) is in every checkpoint and a
    killed run resumed from one ends with the uninterrupted run's state and loss, bit for bit (with
    sub-centers too: the checkpoint holds classes x K rows)."""
    uninterrupted = tmp_path / "uninterrupted"
    assert run_main(tiny_overrides(uninterrupted, steps=8, **args)).returncode == 0
    run = tmp_path / "run"
    ckdir = run / "checkpoints"
    proc = _start(tiny_overrides(run, steps=8, **args), {"step_sleep_s": 0.15})
    _wait_for(lambda: (ckdir / "step-00000004.pt").is_file() and len(metrics(run)) >= 6, proc)
    _kill(proc)
    head = torch.load(ckdir / "step-00000004.pt", weights_only=True)["head_state"]
    saved = head["buffers"]
    assert saved and all(k.startswith("margin_") for k in saved)
    K = args.get("head.subcenters", 1)
    assert head["subcenters"] == K and head["rows"]["weight"].shape[0] == 8 * K  # 8 synthetic classes
    proc = run_main(tiny_overrides(run, steps=8, **args))
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr
    assert metrics(run)[-1]["loss"] == metrics(uninterrupted)[-1]["loss"]
    got = torch.load(ckdir / "last.pt", weights_only=True)["head_state"]["buffers"]
    want = torch.load(uninterrupted / "checkpoints" / "last.pt", weights_only=True)["head_state"]["buffers"]
    assert got.keys() == want.keys() == saved.keys()
    for key in want:
        assert torch.equal(got[key], want[key]) and not torch.equal(saved[key], want[key]), key
