"""The code base passes ruff (the rules in pyproject.toml) and is formatted by `ruff format`, so
`make test` and CI enforce both."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ruff() -> str:
    ruff = Path(sys.executable).with_name("ruff")
    binary = str(ruff) if ruff.exists() else shutil.which("ruff")
    if binary is None:
        pytest.skip("ruff is not installed (it comes with requirements/cpu.txt)")
    return binary


def test_ruff_finds_nothing():
    proc = subprocess.run([_ruff(), "check", "--no-cache", "."], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_code_is_formatted():
    """`ruff format --check`: run `ruff format .` to fix what it names."""
    proc = subprocess.run(
        [_ruff(), "format", "--check", "--no-cache", "."], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
