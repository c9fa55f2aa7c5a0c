"""bench/gpu_check.sh: its clean no-GPU exit, and every stage at toy sizes (--smoke) on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PY": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a CUDA device is present, so there is no no-GPU exit to test"
)
def test_without_a_gpu_it_stops_with_one_line_naming_what_is_missing(tmp_path):
    proc = _run("--out", str(tmp_path / "check"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "no CUDA GPU" in lines[0] and "torch.cuda.is_available() is False" in lines[0]
    assert not (tmp_path / "check").exists()  # nothing written before the check knows it can run


@pytest.mark.slow
def test_smoke_runs_every_stage_and_writes_the_json(tmp_path):
    """Slow (~1-2 min on 2 cores): it builds synthetic shards and trains MobileFaceNet and IR-50 for
    a few steps, the only way to check the script's stages before it meets a GPU."""
    out = tmp_path / "check"
    proc = _run("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in result["stages"]}
    assert result["failed"] == []
    assert set(stages) >= {
        "head_tests",
        "head_bench_C1000",
        "build_shards",
        "loader_dali",
        "train_mobilefacenet",
        "train_ir50",
    }
    assert stages["build_shards"]["samples"] == 20 * 8
    assert stages["head_bench_C1000"]["ms"] > 0 and stages["head_bench_C1000"]["reference_working_mib"] >= 0
    for name in ("train_mobilefacenet", "train_ir50"):
        assert stages[name]["steps"] == 4 and stages[name]["images_per_s"] > 0
        assert 0.0 <= stages[name]["data_wait"] <= 1.0
    if stages["loader_dali"]["ok"]:
        assert stages["loader_dali"]["images_per_s"] > 0 and result["skipped"] == []
    else:
        assert stages["loader_dali"]["note"].startswith("skipped: nvidia.dali is not importable")
        assert result["skipped"] == ["loader_dali"] and "| loader_dali         | skip" in proc.stdout
    assert "| train_ir50" in proc.stdout  # the Markdown table


def test_preflight_does_not_require_packages_no_stage_uses(monkeypatch):
    """webdataset is used only by shard-format tests, none of which the check runs; a GPU machine
    without it must still run the check."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "_gpu_check", gpu_check)  # its dataclasses look it up there
    spec.loader.exec_module(gpu_check)
    monkeypatch.setitem(sys.modules, "webdataset", None)  # `import webdataset` now raises ImportError
    env = gpu_check.preflight(smoke=True)
    assert env["device"] in ("cpu", "cuda")
