"""The one walk of a folder tree as people have it: which regular files it holds, and what was left
out and why.

Every command that reads a folder of photos walks it here, so that none of them can hang on a FIFO
named `x.jpg` (opening one blocks until a writer comes), loop for ever through a link to a folder
above it, or end in a traceback on a name that is not UTF-8 (it cannot be written to a manifest, a
log or a JSON record). Links are followed, to files and to folders, except one back to a folder
that holds it. A name that is not UTF-8 is left out and shown with its bytes escaped (`\\xff`).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from common.cli import UserError


class Skipped(NamedTuple):
    rel: str  # '/'-separated path relative to the root, printable (bytes that are not UTF-8 escaped)
    reason: str  # not_a_file | name_not_utf8 | link_loop | link_broken | unreadable | hidden | too_deep
    detail: str


@dataclass
class Tree:
    files: list[str] = field(default_factory=list)  # regular files (or links to them), relative, sorted
    folders: list[str] = field(default_factory=list)  # the folders entered, relative, sorted
    skipped: list[Skipped] = field(default_factory=list)  # what was not read, and why

    def paths(self, root: Path) -> list[Path]:
        return [root / rel for rel in self.files]


def printable(name: str) -> str:
    """A file name as text that can be written anywhere: bytes that are not UTF-8 escaped."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _utf8(name: str) -> bool:
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode made its undecodable bytes into lone surrogates
        return False
    return True


def _unreadable(name: str, err: OSError) -> Skipped:
    if err.errno == errno.ELOOP:
        return Skipped(name, "link_loop", f"a link that loops ({err.strerror})")
    if err.errno == errno.ENOENT:
        return Skipped(name, "link_broken", f"a link to nothing ({err.strerror})")
    return Skipped(name, "unreadable", err.strerror or type(err).__name__)


def regular_files(root: Path | str, depth: int | None = None, hidden: bool = True) -> Tree:
    """Every regular file under `root`, at most `depth` levels down (1: only those in `root`);
    `hidden=False` leaves out names that start with a dot. UserError when `root` cannot be read."""
    tree = Tree()
    try:
        top = os.stat(root)
    except OSError as err:
        raise UserError(f"{root}: cannot read the folder ({err.strerror})") from None
    # (folder path, its relative path, its level, the (device, inode) of it and the folders above it)
    stack = [(os.fspath(root), "", 0, frozenset({(top.st_dev, top.st_ino)}))]
    while stack:
        path, rel, level, above = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as err:
            if not rel:
                raise UserError(f"{root}: cannot read the folder ({err.strerror})") from None
            tree.skipped.append(Skipped(rel, "unreadable", f"cannot read the folder ({err.strerror})"))
            continue
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            if not _utf8(entry.name):
                tree.skipped.append(
                    Skipped(printable(name), "name_not_utf8", "the name is not UTF-8 (rename it)")
                )
                continue
            if not hidden and entry.name.startswith("."):
                tree.skipped.append(Skipped(name, "hidden", "a hidden name"))
                continue
            try:
                if entry.is_file():  # follows a link; a plain file needs no system call (d_type)
                    tree.files.append(name)
                    continue
                info = entry.stat()
            except OSError as err:
                tree.skipped.append(_unreadable(name, err))
                continue
            if not stat.S_ISDIR(info.st_mode):
                tree.skipped.append(Skipped(name, "not_a_file", "not a regular file (a FIFO or device)"))
            elif depth is not None and level + 1 >= depth:
                tree.skipped.append(Skipped(name, "too_deep", f"a folder more than {depth} levels down"))
            elif (info.st_dev, info.st_ino) in above:
                tree.skipped.append(Skipped(name, "link_loop", "a link to a folder above it: not followed"))
            else:
                tree.folders.append(name)
                stack.append((entry.path, name, level + 1, above | {(info.st_dev, info.st_ino)}))
    tree.files.sort()
    tree.folders.sort()
    return tree
