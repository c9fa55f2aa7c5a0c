"""The one lock on an output folder (a build's --out, a training's run.dir): one writer at a time.

`folder_lock(folder, refusal)` holds an exclusive `flock` on the folder itself for the block; a second
process asking for it gets one UserError line naming the folder and the process that holds it. The
OS drops the lock when the holder ends, `kill -9` included, so a killed run never blocks its rerun
(nothing is written into the folder, so there is no stale lock file to clean up). The holder is read
from /proc/locks (Linux); elsewhere the line says "another process". On a filesystem that cannot lock
a folder the block runs unlocked, after a warning line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from common.cli import UserError, log


def lock_holder(fd: int) -> int | None:
    """The pid holding a flock on the file open as `fd`, from /proc/locks; None when unknown."""
    st = os.fstat(fd)
    # /proc/locks: "1: FLOCK  ADVISORY  WRITE 1234 fe:00:260072 0 EOF" (device in hex, then inode)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and where in fields:
                    pid = int(fields[fields.index(where) - 1])
                    return pid or None  # 0: a process outside this pid namespace
    except (OSError, ValueError):
        pass
    return None


def _describe(pid: int | None) -> str:
    if pid is None:
        return "another process"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = " ".join(f.read().decode(errors="replace").replace("\0", " ").split())  # one line
    except OSError:
        command = ""
    if len(command) > 100:
        command = command[:97] + "..."
    return f"process {pid}" + (f" ({command})" if command else "")


@contextlib.contextmanager
def folder_lock(folder: Path | str, refusal: str) -> Iterator[None]:
    """Create `folder` if need be and hold an exclusive lock on it for the block. Taken already:
    UserError "<folder>: <refusal> (held by process <pid> (<its command>))"."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError as err:
        raise UserError(f"{folder}: cannot create or open the folder ({err.strerror or err})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{folder}: {refusal} (held by {_describe(lock_holder(fd))})") from None
        except OSError as err:  # a filesystem without flock on a folder (some NFS setups): go on
            log(
                f"warning: {folder}: cannot lock the folder ({err.strerror or err}); nothing stops a "
                "second writer"
            )
        yield
    finally:
        os.close(fd)  # closing releases the lock
