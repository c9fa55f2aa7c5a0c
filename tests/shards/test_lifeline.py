"""shards/lifeline.py: a kill -9 of the process that reads shards leaves no helper process behind.

The reader runs in its own session, so every process it started (forkserver, resource tracker,
DataLoader workers) carries that session id, whoever its parent is after the kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests._loader_util import make_shards

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _session(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live (not zombie) processes in session `sid`."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            found.append((int(d), cmd))
    return found


def _start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
    )


def _kill_and_expect_no_survivor(proc: subprocess.Popen, within_s: float = 5.0) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + within_s
    while (left := _session(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, _ in left:  # do not leak them into the rest of the run
        os.kill(pid, signal.SIGKILL)
    assert not left, f"alive {within_s} s after the kill: {left}"


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("orphans"), [20, 20])


def test_workers_reading_end_with_the_reader(shard_dir):
    proc = _start(["-m", "tests._orphan_child", str(shard_dir), "2"])
    assert proc.stdout.readline().strip() == "ready"
    helpers = [cmd for pid, cmd in _session(proc.pid) if pid != proc.pid]
    assert sum("forkserver" in c for c in helpers) == 3  # the server and its two workers
    _kill_and_expect_no_survivor(proc)


def test_kill_while_the_forkserver_starts(shard_dir):
    """The kill lands while the forkserver imports torch, before any worker exists."""
    proc = _start(["-m", "tests._orphan_child", str(shard_dir), "2"])
    deadline = time.monotonic() + 60
    while not any("forkserver" in cmd for _, cmd in _session(proc.pid)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    _kill_and_expect_no_survivor(proc)


def test_the_polling_fallback_alone(tmp_path):
    """Without the parent-death signal (as off Linux) the polling thread still ends the child."""
    child = textwrap.dedent("""
        import os, subprocess, sys, time
        code = ("import os, sys, time; import shards.lifeline as l; "
                "l.parent_death_signal = lambda: False; "
                "l.end_with_parent(int(sys.argv[1])); print('tied', flush=True); time.sleep(60)")
        grand = subprocess.Popen([sys.executable, "-c", code, str(os.getpid())], stdout=sys.stdout)
        time.sleep(60)
    """)
    proc = _start(["-c", child])
    assert proc.stdout.readline().strip() == "tied"
    _kill_and_expect_no_survivor(proc, within_s=3.0)
