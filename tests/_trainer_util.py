"""Shared helpers for the trainer tests: a tiny synthetic run's overrides and a subprocess runner
(trainer/main.py, or tests/_trainer_faults.py when faults are injected)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "trainer" / "main.py"
SHIPPED_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))  # every config the project ships


def cpu_run(run_dir: Path, steps: int) -> dict[str, object]:
    """Overrides that run any config `steps` steps in seconds on the CPU and leave its recipe (model,
    head, optimizer, schedule) alone: 8 synthetic identities x 8 images at 32x32, batch 16, fp32,
    not compiled, in `run_dir`."""
    return {
        "data.source": "synthetic",
        "data.synthetic.classes": 8,
        "data.synthetic.per_class": 8,
        "data.synthetic.image_size": "[32,32]",
        "loader.batch_size": 16,
        "schedule.steps": steps,
        "model.compile": "false",
        "precision.dtype": "fp32",
        "run.dir": str(run_dir),
        "run.devices": "cpu",
    }


def as_overrides(values: dict[str, object]) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


def tiny_overrides(run_dir: Path, steps: int = 12, **extra: object) -> list[str]:
    """A run of a few seconds: `cpu_run` with the tiny backbone of width 8 and a plain recipe."""
    base = {
        **cpu_run(run_dir, steps),
        "model.backbone": "tiny",
        "model.embedding_size": 32,
        "model.kwargs.width": 8,
        "model.channels_last": "false",
        "schedule.warmup_steps": 0,
        "optim.lr": 0.1,
        "head.s": 30.0,
        "head.m": 0.2,
        "logging.every_steps": 1,
        "checkpoint.every_steps": 4,
    }
    base.update(extra)
    return as_overrides(base)


def teacher_file(path: Path, embedding_size: int = 32, size: int = 32, seed: int = 0) -> Path:
    """An untrained tiny backbone (width 8) saved as an embedding-model file: a distill.teacher."""
    from models.backbones import build_backbone
    from models.model_file import save_embedding_checkpoint

    torch.manual_seed(seed)
    backbone = build_backbone("tiny", embedding_size, (size, size), width=8)
    spec = {"backbone": "tiny", "embedding_size": embedding_size, "image_size": [size, size]}
    save_embedding_checkpoint(path, {**spec, "kwargs": {"width": 8}}, backbone.state_dict())
    return path


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return e


def main_command(faults: dict | None = None) -> list[str]:
    """The script (and its first argument) to run: trainer/main.py, or it with these FaultHooks."""
    if not faults:
        return [str(MAIN)]
    return ["-m", "tests._trainer_faults", json.dumps(faults)]


def run_main(
    args: list[str], timeout: float = 120, faults: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *main_command(faults), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        cwd=ROOT,
    )


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def backbone_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["backbone_state"]


VAL_CLASSES = 8


def pair_shards(root: Path, shift: int = 0, dataset: str = "lfw") -> Path:
    """Validation shards: 40 faces of 8 identities at 32x32 (sample i has label i % 8) and 60 pairs in
    10 folds; `shift` changes which faces pair up, so two sets score differently."""
    from shards.manifest import MANIFEST_NAME, write_manifest
    from tests._loader_util import make_shards

    make_shards(root, [24, 16], num_classes=VAL_CLASSES, size=32)
    data = json.loads((root / MANIFEST_NAME).read_text())
    key = lambda i: f"id{i % VAL_CLASSES:03d}__img_{i:05d}"  # noqa: E731 - make_shards' key scheme
    pairs = []
    for f in range(10):
        for k in range(3):
            c = (f + k + shift) % VAL_CLASSES
            pairs.append({"a": key(c), "b": key(c + VAL_CLASSES * (1 + k % 4)), "same": True, "fold": f})
            pairs.append(
                {"a": key(c), "b": key((c + 3) % VAL_CLASSES + VAL_CLASSES * 2), "same": False, "fold": f}
            )
    data.update(dataset=dataset, split="test", pairs=pairs)
    write_manifest(root, data)
    return root
