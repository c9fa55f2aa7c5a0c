"""Crash-safe file writes: the one temp-file-fsync-rename mechanism every stage uses.

A reader (or a rerun after `kill -9`) only ever sees the old file or the complete new one. The
temporary file is `<name>.tmp` beside the target, so leftovers are easy to find and clean up; a
write that fails removes it. OS errors (disk full, read-only folder, a file where a folder should
be) become one UserError line naming the file.

Also the encoding every text input is read with, `TEXT_ENCODING`: UTF-8 with or without the
byte-order mark some editors put first (plain "utf-8" would keep it as part of the first row).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from common.cli import UserError

TMP_SUFFIX = ".tmp"
TEXT_ENCODING = "utf-8-sig"


def tmp_path_for(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def fsync_dir(path: Path | str) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(
    path: Path | str, mode: str = "wb", *, what: str = "file", encoding: str | None = None
) -> Iterator[IO]:
    """Open `<path>.tmp` for writing; on a clean exit fsync it and rename it onto `path`.

    `what` names the file in the error line ("cannot write the <what>"). An exception inside the
    block removes the temporary file and leaves `path` untouched.
    """
    path = Path(path)
    tmp = tmp_path_for(path)
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, mode, encoding=encoding)  # noqa: SIM115 (closed below, before the rename)
    except OSError as err:
        raise UserError(f"{path}: cannot write the {what} ({err.strerror or err})") from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write the {what} ({err.strerror or err})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def checked_replace(path: Path | str) -> Iterator[Path]:
    """Yield `<path>.tmp` for the caller to write and check; on a clean exit rename it onto `path`.

    For outputs a command checks after writing (an export it runs): an exception inside the block
    (the check failed) removes the temporary file and leaves the old `path`, if any, untouched.
    """
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"{path}: cannot write it ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_text(path: Path | str, text: str, *, what: str = "file") -> Path:
    with atomic_write(path, "w", what=what) as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: Path | str, data: bytes, *, what: str = "file") -> Path:
    with atomic_write(path, "wb", what=what) as f:
        f.write(data)
    return Path(path)
