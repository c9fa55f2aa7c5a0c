"""One writer per folder (common/folder_lock.py): a second training on the same run.dir stops with one
line naming the folder and the process that holds it; a holder killed with -9 blocks nothing."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.cli import UserError
from common.folder_lock import folder_lock, lock_holder
from tests._trainer_util import ROOT, env, main_command, tiny_overrides

# A process that takes the lock as a training or a build does, says so, and keeps it.
HOLDER = (
    "import sys, time\n"
    "from common.folder_lock import folder_lock\n"
    "with folder_lock(sys.argv[1], 'busy'):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(600)\n"
)


def start_holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env={**env(), "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def kill_hard(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_held_folder_is_refused_naming_the_holder_and_freed_when_it_is_killed(tmp_path):
    folder = tmp_path / "out"
    holder = start_holder(folder)
    try:
        with pytest.raises(UserError) as info, folder_lock(folder, "another writer is here"):
            pass
        message = str(info.value)
        assert message.startswith(f"{folder}: another writer is here (held by process {holder.pid} (")
        assert "folder_lock" in message and "\n" not in message  # its command line, cut to one line
    finally:
        kill_hard(holder)
    with folder_lock(folder, "another writer is here"):  # kill -9 left no lock behind
        fd = os.open(folder, os.O_RDONLY)
        try:
            assert lock_holder(fd) == os.getpid()
        finally:
            os.close(fd)
    assert list(folder.iterdir()) == []  # nothing written into the folder: no stale lock file


def test_a_second_training_on_the_run_folder_stops_and_a_killed_one_resumes(tmp_path, capsys):
    """A real training holds run.dir (it hangs in its third step, after logging and checkpointing
    step 2); a second one on the same folder ends with rc 2 and one line; after kill -9 of the
    first, the rerun resumes."""
    from trainer.main import main

    run = tmp_path / "run"
    args = tiny_overrides(run, steps=8, **{"logging.tensorboard": "off", "checkpoint.every_steps": 1})
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(
            [sys.executable, *main_command({"hang_rank": 0, "hang_step": 2}), *args],
            stdout=out,
            stderr=out,
            env=env(),
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 120
        # hang_step counts completed steps: it hangs in the third step, after step 2's record and
        # checkpoint, so nothing more is written while the second training tries
        while not (run / "checkpoints" / "step-00000002.pt").exists():
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the first training never wrote its first checkpoint"
            time.sleep(0.2)
        records = (run / "metrics.jsonl").read_text()
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(
            f"error: {run}: another training is using this run folder; wait for it to end "
            f"or choose another run.dir (held by process {first.pid} ("
        )
        assert "tests._trainer_faults" in err and "\n" not in err  # the holder's command, in the one line
        assert (run / "metrics.jsonl").read_text() == records  # the second one wrote nothing
    finally:
        kill_hard(first)
    assert main(args) == 0
    assert "resumed from" in capsys.readouterr().err


def test_a_filesystem_without_folder_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    from common import folder_lock as module

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(module.fcntl, "flock", no_locks)
    with folder_lock(tmp_path, "busy"):  # no error: the work goes on
        (tmp_path / "written").touch()
    assert (tmp_path / "written").exists()
    reason = os.strerror(errno.ENOLCK)
    assert capsys.readouterr().err == (
        f"warning: {tmp_path}: cannot lock the folder ({reason}); nothing stops a second writer\n"
    )


def test_only_rank_0_takes_the_run_folder_lock(tmp_path, monkeypatch):
    """Under torchrun the other ranks write nothing there: they must not stop on rank 0's lock."""
    from trainer.main import run_folder_lock

    holder = start_holder(tmp_path)
    try:
        monkeypatch.setenv("RANK", "1")
        with run_folder_lock(str(tmp_path)):
            pass
        monkeypatch.setenv("RANK", "0")
        with (
            pytest.raises(UserError, match="another training is using this run folder"),
            run_folder_lock(str(tmp_path)),
        ):
            pass
    finally:
        kill_hard(holder)
