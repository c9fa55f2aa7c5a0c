"""common/walk.py, the one walk of a folder of photos: regular files only (a FIFO named x.jpg is
never opened), links followed but never in a loop, names that are not UTF-8 left out with their
bytes escaped; and identify's gallery walk, which goes through it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.cli import UserError
from common.walk import regular_files
from eval.identify import gallery_photos


def _tree(root: Path) -> Path:
    for rel in ["ana/a1.jpg", "ana/sub/a2.jpg", "bo/b1.png", "top.jpg", ".hidden/h.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * 100)
    os.mkfifo(root / "ana" / "fifo.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")  # a link to itself
    os.symlink("nowhere.jpg", root / "bo" / "broken.jpg")
    os.symlink("..", root / "ana" / "up")  # back to the root: a loop
    os.symlink("../bo", root / "ana" / "bo_too")  # to a sibling: no loop, followed
    os.symlink("../top.jpg", root / "bo" / "linked.jpg")  # a link to a regular file is one
    os.mkdir(os.fsencode(root) + b"/caf\xe9")  # Latin-1 names, as an old camera or a zip leaves them
    (Path(os.fsdecode(os.fsencode(root) + b"/caf\xe9")) / "c.jpg").write_bytes(b"x")
    (Path(os.fsdecode(os.fsencode(root) + b"/bo/\xff.jpg"))).write_bytes(b"x")
    return root


def test_only_regular_files_links_without_loops_and_utf8_names(tmp_path: Path) -> None:
    tree = regular_files(_tree(tmp_path / "g"))
    assert tree.files == [
        ".hidden/h.jpg",
        "ana/a1.jpg",
        "ana/bo_too/b1.png",
        "ana/bo_too/linked.jpg",
        "ana/sub/a2.jpg",
        "bo/b1.png",
        "bo/linked.jpg",
        "top.jpg",
    ]
    assert {s.rel: s.reason for s in tree.skipped} == {
        "ana/fifo.jpg": "not_a_file",
        "ana/up": "link_loop",
        "ana/bo_too/broken.jpg": "link_broken",
        "bo/broken.jpg": "link_broken",
        "ana/bo_too/\\xff.jpg": "name_not_utf8",
        "loop.jpg": "link_loop",
        "caf\\xe9": "name_not_utf8",
        "bo/\\xff.jpg": "name_not_utf8",
    }
    for s in tree.skipped:  # each reason can be written anywhere: a log line, JSON, a manifest
        s.rel.encode("utf-8")
        s.detail.encode("utf-8")


def test_depth_and_hidden_names(tmp_path: Path) -> None:
    tree = regular_files(_tree(tmp_path / "g"), depth=2, hidden=False)
    assert tree.files == ["ana/a1.jpg", "bo/b1.png", "bo/linked.jpg", "top.jpg"]
    reasons = {s.rel: s.reason for s in tree.skipped}
    assert reasons[".hidden"] == "hidden" and reasons["ana/sub"] == "too_deep"
    assert reasons["ana/bo_too"] == "too_deep" and "ana/up" in reasons


def test_an_unreadable_root_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read the folder"):
        regular_files(tmp_path / "missing")


def test_identify_gallery_never_lists_a_fifo_a_loop_or_a_name_it_cannot_write(tmp_path: Path, capsys) -> None:
    root = _tree(tmp_path / "g")
    photos = [(person, p.relative_to(root).as_posix()) for person, p in gallery_photos(root)]
    assert photos == [
        (".hidden", ".hidden/h.jpg"),
        ("ana", "ana/a1.jpg"),
        ("ana", "ana/bo_too/b1.png"),
        ("ana", "ana/bo_too/linked.jpg"),
        ("ana", "ana/sub/a2.jpg"),
        ("bo", "bo/b1.png"),
        ("bo", "bo/linked.jpg"),
        ("top", "top.jpg"),
    ]
    err = capsys.readouterr().err
    assert "fifo.jpg: not a regular file" in err and "caf\\xe9: the name is not UTF-8" in err
