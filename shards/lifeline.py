"""Helper processes (the decode forkserver and its DataLoader workers) end when their owner dies.

Why this is needed: a forkserver exits when its "alive" pipe reaches EOF, but every worker it forks
holds a copy of that pipe's write end, and a torch worker only exits when its parent (the
forkserver) changes. After a kill -9 of the trainer each keeps the other alive for ever, and the
resource tracker with them (it waits for all of them to close its pipe).

The chain here: the forkserver imports `shards.forkserver_guard`, which ties it to the trainer; each
worker's init ties it to the forkserver and to the trainer. "Tied" means, on Linux, a parent-death
signal (prctl PR_SET_PDEATHSIG, SIGKILL) and, everywhere, a daemon thread that polls the parent pid
and the owner's pid and leaves with `os._exit` when either is gone (the portable fallback, and the
cover for a parent that died before the prctl call).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

OWNER_ENV = "FACETRAIN_OWNER_PID"  # the trainer's pid, for the forkserver it starts
POLL_S = 0.5
_PR_SET_PDEATHSIG = 1


def parent_death_signal() -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits; False where that is not offered."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists and has not exited (a zombie counts as exited on Linux)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc: the kill check above is all there is


def _gone(parent: int, owner: int | None) -> bool:
    return os.getppid() != parent or (owner is not None and not pid_alive(owner))


def _watch(parent: int, owner: int | None) -> None:
    while not _gone(parent, owner):
        time.sleep(POLL_S)
    os._exit(1)


def end_with_parent(parent: int, owner: int | None = None, *, thread: bool = True) -> None:
    """Make this process end when `parent` (which must be its parent) or `owner` exits.

    Exits at once if that already happened. `thread=False` skips the polling thread where the
    parent-death signal works (for a process that forks: the forkserver).
    """
    has_signal = parent_death_signal()
    if _gone(parent, owner):
        os._exit(1)
    if thread or not has_signal:
        threading.Thread(target=_watch, args=(parent, owner), name="facetrain-lifeline", daemon=True).start()
