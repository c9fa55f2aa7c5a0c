"""build_shards when the output folder fails it: disk full, and two builds racing on one --out."""

from __future__ import annotations

import errno
import fcntl
import json
import os

from common.cli import run_cli
from preprocess import build_shards
from preprocess._marker_faces import write_vggface2
from shards import writer


def test_disk_full_is_one_line_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    root = tmp_path / "raw"
    write_vggface2(root, identities=3, per_identity=4, size=(120, 150), eye_px=(35.0, 45.0))
    out = tmp_path / "out"
    real_write = writer._HashingFile.write
    budget = {"bytes": 45_000}

    def write(self, data):  # the device fills up part-way through the second shard
        budget["bytes"] -= len(data)
        if budget["bytes"] < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(writer._HashingFile, "write", write)
    argv = ["vggface2", "--root", str(root), "--out", str(out), "--workers", "1", "--samples-per-shard", "4"]
    assert run_cli(build_shards.main, argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # after the log lines naming the inputs and the progress bar
    assert last.startswith("error: ") and "No space left on device" in last and "Traceback" not in err
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    # Room again: the rerun completes, keeping the shards that were finished.
    monkeypatch.setattr(writer._HashingFile, "write", real_write)
    assert run_cli(build_shards.main, argv) == 0
    captured = capsys.readouterr()
    assert "resuming" in captured.err and json.loads(captured.out.splitlines()[-1])["samples"] == 12


def test_a_second_build_on_the_same_out_is_refused(tmp_path, capsys):
    root = tmp_path / "raw"
    write_vggface2(root, identities=2, per_identity=3, size=(120, 150), eye_px=(35.0, 45.0))
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running build holds it
        argv = ["vggface2", "--root", str(root), "--out", str(out), "--workers", "1"]
        assert run_cli(build_shards.main, argv) == 2
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1]  # after the log lines naming the inputs
        assert last.startswith("error: ") and "another build is writing to this folder" in last
        assert "Traceback" not in err
        assert list(out.iterdir()) == []
    finally:
        os.close(fd)
    assert run_cli(build_shards.main, argv) == 0
