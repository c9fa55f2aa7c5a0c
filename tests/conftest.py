"""Shared fixtures.

`synthetic_raw`: a small synthetic raw data set (preprocess/synthetic.py), generated once per test
session: ROOT/vggface2/ and ROOT/lfw/ in the real layouts. Treat it as read-only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# OpenMP threads that wait for work sleep instead of spinning (set before anything loads torch's
# libgomp; subprocesses inherit it). On a busy 2-core machine the spinning threads of one process
# take the cores the others need: torch's CPU work ran 5-15x slower than with this policy (measured:
# a MobileFaceNet forward, tests/trainer/test_engine_faults.py), at the same results (each op is
# split over the same threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Small but complete: every fold gets two LFW identities (the minimum for different-person pairs).
SYNTHETIC_ARGS = (
    "--identities",
    "12",
    "--images-per-identity",
    "6",
    "--lfw-identities",
    "20",
    "--seed",
    "0",
    "--workers",
    "1",
)


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a generated data set: 12 training identities x 6 images, 20 LFW identities, seed 0."""
    from preprocess import synthetic

    root = tmp_path_factory.mktemp("synthetic_raw")
    assert synthetic.main(["--out", str(root), *SYNTHETIC_ARGS]) == 0
    return root


@pytest.fixture(scope="session", autouse=True)
def one_forkserver_for_builds_and_loaders() -> None:
    """Python runs one forkserver per process and it preloads what its first user asked for: in a
    session that builds shards (preprocess) before it reads them (shards), each DataLoader worker
    would import torch and cv2 when it starts (~1-2 s; test_loader.py's torch tests took 3-10x
    longer). Started here with both preload lists, as each command has its own when it runs alone
    (the shards guard first: the server ends with this process)."""
    import multiprocessing
    from multiprocessing import forkserver

    from preprocess.build_shards import POOL_PRELOAD
    from shards.lifeline import OWNER_ENV
    from shards.torch_pipeline import WORKER_PRELOAD

    os.environ[OWNER_ENV] = str(os.getpid())
    multiprocessing.get_context("forkserver").set_forkserver_preload([*WORKER_PRELOAD, *POOL_PRELOAD])
    forkserver.ensure_running()
