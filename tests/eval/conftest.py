"""The real-LFW fixture that test_lfw_real.py and test_verify_real.py share."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._real_lfw import LFW, REFERENCE


@pytest.fixture(scope="session")
def reference_lfw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(all of real LFW aligned at 112x96, the reference MobileFaceNet imported for that size), built
    once per session (~10 s on 2 cores). Read-only; request it only from tests skipped without
    LFW or REFERENCE."""
    from eval.import_mobilefacenet import main as import_main
    from preprocess.build_shards import main as build_main

    root = tmp_path_factory.mktemp("reference_lfw")
    shards, ckpt = root / "lfw-112x96", root / "reference.pt"
    assert build_main(["lfw", "--root", str(LFW), "--out", str(shards), "--image-size", "112x96"]) == 0
    assert import_main(["--source", str(REFERENCE), "--out", str(ckpt), "--image-size", "112x96"]) == 0
    return shards, ckpt
