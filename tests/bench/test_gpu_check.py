"""bench/gpu_check.sh: its clean no-GPU exit, every stage at toy sizes (--smoke) on the CPU, what it
leaves in --out (at most the three result files, valid after every stage, a run killed midway
included), and its --deadline."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"
RESULT_FILES = {"gpu_check.json", "gpu_check.md", "logs.tgz"}


def _env(scratch: Path) -> dict[str, str]:
    # TMPDIR: the check's scratch folder lands under the test's tmp_path (a killed run cannot remove it);
    # OMP_WAIT_POLICY: the suite's (tests/conftest.py), for the stages' torch
    return {
        "PATH": "/usr/bin:/bin",
        "PY": sys.executable,
        "HOME": os.environ.get("HOME", "/tmp"),
        "TMPDIR": str(scratch),
        **{k: v for k, v in os.environ.items() if k == "OMP_WAIT_POLICY"},
    }


def _run(tmp_path: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=_env(scratch), timeout=timeout
    )


def _module():
    spec = importlib.util.spec_from_file_location("_gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["_gpu_check"] = gpu_check  # its dataclasses look it up there
    spec.loader.exec_module(gpu_check)
    return gpu_check


def _check_out(out: Path) -> dict:
    """--out holds only the result files; the JSON parses; the archive opens."""
    names = {p.name for p in out.iterdir()}
    assert names <= RESULT_FILES and len(names) <= 4, names
    result = json.loads((out / "gpu_check.json").read_text())
    if (out / "logs.tgz").exists():
        with tarfile.open(out / "logs.tgz") as tar:
            assert all(n.startswith("logs/") for n in tar.getnames())
    return result


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a CUDA device is present, so there is no no-GPU exit to test"
)
def test_without_a_gpu_it_stops_with_one_line_naming_what_is_missing(tmp_path):
    proc = _run(tmp_path, "--out", str(tmp_path / "check"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "no CUDA GPU" in lines[0] and "torch.cuda.is_available() is False" in lines[0]
    assert not (tmp_path / "check").exists()  # nothing written before the check knows it can run


@pytest.mark.slow
def test_smoke_runs_every_stage_and_writes_only_the_result_files(tmp_path):
    """Slow (2-5 min on 2 cores): it builds synthetic shards and trains MobileFaceNet and IR-50 for
    a few steps, the only way to check the script's stages before it meets a GPU."""
    out = tmp_path / "check"
    proc = _run(tmp_path, "--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("machine: ")  # the machine first
    result = _check_out(out)
    assert {p.name for p in out.iterdir()} == RESULT_FILES
    stages = {s["name"]: s for s in result["stages"]}
    assert result["failed"] == []
    assert set(stages) >= {
        "head_tests",
        "head_bench_C1000",
        "build_shards",
        "train_mobilefacenet",
        "train_ir50",
    }
    assert stages["build_shards"]["samples"] == 20 * 8
    bench = stages["head_bench_C1000"]
    assert bench["arcface_chunked_ms"] > 0 and bench["arcface_reference_ms"] > 0
    assert {r["impl"] for r in bench["rows"]} == {"reference", "chunked"}
    # the fused head's modes, right after the kernels: save_logits needs CUDA (skipped here, saying
    # so); the bf16 dW runs through the script in the chunked head's stand-in, recorded in its row
    assert stages["head_saved_C1000"]["note"] == "skipped: --save-logits needs the fused head (CUDA)"
    grad = stages["head_saved_gbf16_C1000"]
    assert grad["ok"] and grad["grad_dtype"] == "bf16" and grad["arcface_chunked_ms"] > 0
    assert [(r["impl"], r["grad_dtype"], r["subcenters"]) for r in grad["rows"]] == [("chunked", "bf16", 1)]
    names = [s["name"] for s in result["stages"]]
    i = names.index("kernels")
    assert names[i + 1 : i + 3] == ["head_saved_C1000", "head_saved_gbf16_C1000"], names
    # the kernels stage's second call (first configs, bf16 dW): the model's step with the _gbf16 suffix
    kernels = stages["kernels"]
    assert kernels["ok"] and kernels["first_ms_sm_90_fp16_gbf16"] > 0
    assert kernels["first_ms_sm_90_fp16_saved_gbf16"] > 0
    assert kernels["floor_ms_sm_90_fp16_saved_gbf16"] == kernels["floor_ms_sm_90_fp16_saved"]  # same shape
    for name in ("train_mobilefacenet", "train_ir50"):
        assert stages[name]["steps"] == 4 and stages[name]["images_per_s"] > 0
        assert 0.0 <= stages[name]["data_wait"] <= 1.0
        assert stages[name]["steps_per_epoch"] == 20 * 8 // 4
    if "loader_dali" in result["skipped"]:
        assert stages["loader_dali"]["note"].startswith("skipped: nvidia.dali is not importable")
    elif "loader_dali" in stages:
        assert stages["loader_dali"]["images_per_s"] > 0
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("machine: ") and "| train_ir50 |" in md
    assert proc.stdout.rstrip().splitlines()[-2].startswith("| ")  # ends with the table (then a summary)
    with tarfile.open(out / "logs.tgz") as tar:
        assert "logs/train_ir50.log" in tar.getnames() and "logs/head_tests.stdout" in tar.getnames()
        assert {"logs/kernels.json", "logs/kernels_gbf16.json"} <= set(tar.getnames())
    # the check's scratch folder (shards, runs) is removed (the stages' own temp files may remain)
    assert not list((tmp_path / "scratch").glob("gpu_check-*"))


@pytest.mark.slow
def test_killed_midway_it_has_written_valid_results(tmp_path):
    """Slow (~20-40 s on 2 cores): runs the smoke check until its JSON holds a finished stage, then
    kills the whole process group with SIGKILL (the next stage mid-run), as a time limit would."""
    out = tmp_path / "check"
    (tmp_path / "scratch").mkdir()
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--smoke", "--out", str(out)],
        env=_env(tmp_path / "scratch"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    seen: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "gpu_check.json").exists():
                seen.append(len(_check_out(out)["stages"]))  # valid at every look, not only at the end
                if seen[-1] >= 1:
                    time.sleep(2.0)  # into the next stage
                    break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert seen and seen[-1] >= 1, seen
    result = _check_out(out)
    assert result["stages"][0]["name"] == "head_tests" and result["stages"][0]["ok"]
    with tarfile.open(out / "logs.tgz") as tar:
        assert "logs/head_tests.log" in tar.getnames()


@pytest.mark.slow
def test_deadline_skips_what_cannot_finish_and_says_so(tmp_path):
    """Slow (~30-50 s): a 30-second deadline leaves time for the first stage or two, never for a
    training stage (its smoke estimate is 40 s)."""
    out = tmp_path / "check"
    start = time.monotonic()
    proc = _run(tmp_path, "--smoke", "--deadline", "30", "--out", str(out), timeout=300)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = _check_out(out)
    assert result["skipped"], result
    skipped = [s for s in result["stages"] if s["name"] in result["skipped"]]
    assert any("--deadline" in s["note"] for s in skipped)
    assert {"train_mobilefacenet", "train_ir50"} <= set(result["skipped"])
    assert took < 30 + 15  # the deadline, plus interpreter start-up and writing the results
    assert "skip" in proc.stdout


def test_deadline_arithmetic_skips_a_stage_that_would_overrun(tmp_path, monkeypatch):
    gpu_check = _module()
    env = {
        "device": "cpu",
        "torch": "x",
        "torch_cuda": None,
        "triton": "y",
        "python": "3",
        "cpus": 2,
        "dali": None,
    }
    check = gpu_check.Check(tmp_path, env, gpu_check.SMOKE, True, deadline=10.0)
    try:
        stage, out = check.run("late", [sys.executable, "-c", "print(1)"], estimate=30.0)
        assert not stage.ok and stage.skipped and "--deadline" in stage.note and out == ""
        stage, out = check.run("quick", [sys.executable, "-c", "print('{\"a\": 1}')"], estimate=1.0)
        assert stage.ok and gpu_check.last_json(out) == {"a": 1}
        stage, _ = check.run("slow", [sys.executable, "-c", "import time; time.sleep(30)"], estimate=1.0)
        assert not stage.ok and "timed out" in stage.note and stage.seconds < 12  # stopped at the deadline
        check.add(stage)
        assert _check_out(tmp_path)["stages"][0]["name"] == "slow"
    finally:
        check.close()
    assert not check.scratch.exists()


def test_preflight_does_not_require_packages_no_stage_uses(monkeypatch):
    """webdataset is used only by shard-format tests, none of which the check runs; a GPU machine
    without it must still run the check."""
    gpu_check = _module()
    monkeypatch.setitem(sys.modules, "webdataset", None)  # `import webdataset` now raises ImportError
    env = gpu_check.preflight(smoke=True)
    assert env["device"] in ("cpu", "cuda")


def test_a_missing_c_compiler_stops_the_check_with_one_line(tmp_path):
    """Triton builds its launcher with a C compiler on first launch: without one every fused stage
    would fail, so the preflight says so first (CC pointing nowhere simulates the missing compiler)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = dict(_env(scratch), CC=str(tmp_path / "no-such-cc"))
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--smoke", "--out", str(tmp_path / "check")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "no C compiler" in lines[0] and "no-such-cc" in lines[0]
    assert not (tmp_path / "check").exists()


def test_the_launch_problem_names_the_missing_python_header_or_compiler(tmp_path, monkeypatch):
    gpu_check = _module()
    monkeypatch.setattr(gpu_check, "_python_include", lambda: tmp_path)  # no Python.h there
    monkeypatch.delenv("CC", raising=False)
    line = gpu_check.triton_problem(None)
    header = tmp_path / "Python.h"
    assert line == f"Triton cannot build its kernel launcher: no {header} (the python3-dev package)"

    def launch():
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable\nmore")

    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)  # no gcc, no clang
    line = gpu_check.triton_problem(launch)
    assert line.startswith("a tiny Triton kernel failed to launch: no C compiler (CC is unset and neither")
    assert "\n" not in line and "Python.h" in line
    monkeypatch.undo()
    # with both present, a failing launch reports its own error's first line
    line = gpu_check.triton_problem(launch)
    assert (
        line == "a tiny Triton kernel failed to launch: RuntimeError: Failed to find C compiler. Please "
        "specify via CC environment variable"
    )
    assert gpu_check.triton_problem(lambda: None) is None


def test_the_heads_stages_run_without_the_data_packages(tmp_path, monkeypatch):
    """cv2 and rich are imported only by the data, training and loader stages: without them the
    preflight passes and those stages are skipped, naming what is missing."""
    gpu_check = _module()
    monkeypatch.setitem(sys.modules, "cv2", None)
    monkeypatch.setitem(sys.modules, "rich", None)
    env = gpu_check.preflight(smoke=True)
    assert env["data_missing"].startswith("cv2 (") and "; rich (" in env["data_missing"]
    check = gpu_check.Check(tmp_path, env, gpu_check.SMOKE, True, deadline=60.0)
    try:
        stage, _ = gpu_check.stage_data(check)
    finally:
        check.close()
    assert stage.skipped and "cv2" in stage.note and "rich" in stage.note
