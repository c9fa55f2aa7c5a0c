"""Every command answers a mistake in its arguments, or a file that is not what it should be, with
one line naming the problem and exit status 2 (no usage dump, no traceback); and common/cli.py's
progress bar keeps a piped stdout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.cli import progress

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = [
    "preprocess/build_shards.py",
    "preprocess/synthetic.py",
    "trainer/main.py",
    "eval/lfw.py",
    "eval/export_onnx.py",
    "eval/import_mobilefacenet.py",
    "eval/import_insightface.py",
    "-m bench.heads",
    "-m bench.loader",
    "-m bench.preprocess",
    "-m bench.kernels",
    "eval/export_openvino.py",
    "-m bench.deploy",
]


def _run(*args: str) -> subprocess.CompletedProcess:
    command = args[0].split() if args[0].startswith("-m ") else [args[0]]  # a module runs with -m
    return subprocess.run(
        [sys.executable, *command, *args[1:]], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_flag_is_one_line(command):
    proc = _run(command, "--no-such-flag")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    name = f"python {command}" if command.startswith("-m ") else command
    assert len(lines) == 1 and name in lines[0], proc.stderr
    # argparse names the first problem it meets: the unknown flag, or a required argument missing.
    assert "--no-such-flag" in lines[0] or "required" in lines[0], lines[0]


def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path):
    bogus = tmp_path / "manifest.json"
    bogus.write_text('{"not": "a checkpoint"}')
    proc = _run("eval/export_onnx.py", "--checkpoint", str(bogus), "--out", str(tmp_path / "m.onnx"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert str(bogus) in lines[0] and "not a readable checkpoint" in lines[0]


def test_progress_leaves_a_piped_stdout_alone(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """With stderr a terminal, rich would send what is printed while the bar shows through its
    console; results on a stdout piped to a file must still land there."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich takes stderr for a terminal; stdout is captured
    with progress("bar") as shown:
        shown.add_task("task", total=1)
        print("result")
    captured = capsys.readouterr()
    assert captured.out == "result\n" and "result" not in captured.err
