"""build_shards on a folder per identity as people have it (preprocess/folders.py, the plan's key
check in preprocess/build_shards.py): a FIFO named like a photo, a link loop, names that are not
UTF-8, two files whose names make one sample key, a 1x1 "photo". Each is a reject with its reason
(or, for what is no photo, left out); the build ends with rc 0 and every sample key once."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import cv2
import numpy as np

from common.cli import run_cli
from preprocess import build_shards
from preprocess.build_shards import reject_key_collisions
from preprocess.datasets import Entry


def _photo(path: Path, size: int = 112, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    path.write_bytes(cv2.imencode(path.suffix, image)[1].tobytes())  # (cv2.imwrite crashes on non-UTF-8)


def _odd_folder(root: Path) -> None:
    for i, rel in enumerate(["ann/a1.jpg", "ann/a2.jpg", "ann/a.b.jpg", "bob/b1.jpg", "bob/b2.png"]):
        _photo(root / rel, seed=i)
    _photo(root / "ann" / "a_b.jpg", seed=9)  # the key of a.b.jpg: ann__a_b
    _photo(root / "bob" / "b2.jpg", seed=8)  # the key of b2.png: bob__b2
    _photo(root / "bob" / "pixel.png", size=1)
    _photo(root / "bob" / "tiny.jpg", size=8)
    os.mkfifo(root / "ann" / "stuck.jpg")
    os.symlink("self", root / "self")  # an identity folder that is a link to itself
    os.symlink("loop.jpg", root / "bob" / "loop.jpg")  # an image-like name that loops
    os.symlink("..", root / "bob" / "up")  # back up: a folder deeper than an identity's, not read
    latin1 = os.fsencode(root) + b"/ann/Jos\xe9.jpg"
    _photo(Path(os.fsdecode(latin1)))
    os.mkdir(os.fsencode(root) + b"/Ren\xe9e")
    _photo(Path(os.fsdecode(os.fsencode(root) + b"/Ren\xe9e/r.jpg")))


def test_a_folder_as_people_have_it_builds_with_each_problem_a_reject(tmp_path: Path, capsys) -> None:
    root, out = tmp_path / "photos", tmp_path / "out"
    _odd_folder(root)
    argv = [
        "folders",
        "--aligned",
        "--root",
        str(root),
        "--out",
        str(out),
        "--workers",
        "1",
        "--max-reject-fraction",
        "0.9",
    ]
    code = run_cli(build_shards.main, argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = (out / "rejects.jsonl").read_text().splitlines()
    rejects = {r["path"]: r["reason"] for r in map(json.loads, lines)}
    assert rejects == {
        "ann/a_b.jpg": "key_collision",  # a.b.jpg sorts first and is kept
        "bob/b2.png": "key_collision",
        "bob/pixel.png": "image_too_small",
        "bob/tiny.jpg": "image_too_small",
        "ann/stuck.jpg": "not_a_file",
        "bob/loop.jpg": "link_loop",
        "ann/Jos\\xe9.jpg": "name_not_utf8",
        "Ren\\xe9e": "name_not_utf8",
    }
    keys = []
    for tar_path in out.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert sorted(keys) == ["ann__a1", "ann__a2", "ann__a_b", "bob__b1", "bob__b2"]
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["samples"] == 5 and summary["classes"] == 2


def test_key_collisions_keep_the_first_path_and_name_it() -> None:
    entries = [
        Entry("x/b.jpg", "x"),
        Entry("x/a.b.jpg", "x"),
        Entry("x/a_b.png", "x"),
        Entry("x/c.jpg", "x", reason="image_missing"),
        Entry("x/c.png", "x"),
    ]
    got = {e.rel: (e.reason, e.detail) for e in reject_key_collisions(entries)}
    assert got == {
        "x/b.jpg": (None, None),
        "x/a.b.jpg": (None, None),
        "x/a_b.png": ("key_collision", "same sample key x__a_b as x/a.b.jpg"),
        "x/c.jpg": ("image_missing", None),  # a reject already: takes no key
        "x/c.png": (None, None),
    }
