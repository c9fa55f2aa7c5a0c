"""Training checkpoints: the resume state (RNG, optimizer, head, loader position), rotation and auto-resume.

The model part of the dict (header, spec, weights), its atomic write and its checked load live in
models/model_file.py; this module adds what only a training run reads back.

Files in `<run>/checkpoints/`: `step-XXXXXXXX.pt` (the last K kept), `last.pt` (the newest),
`best.pt` (best validation accuracy), `untrained.pt` (before the first step, when asked),
`diverged-step-XXXXXXXX.pt` (the divergence guard's state, for inspection: never resumed from).
Only the state after a finite step with finite weights becomes a step file, and a resume passes over
any file `unusable_reason` objects to.
Every write goes to `<name>.tmp`, is fsync'ed and renamed, so a reader (or a resumed run after
`kill -9`) only ever sees complete files; leftover `.tmp` files are ignored and cleaned up.
"""

from __future__ import annotations

import os
import random
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from common.cli import UserError
from common.fileio import fsync_dir
from models.model_file import WrittenFn, atomic_save, checkpoint_dict, load_checkpoint, model_spec

_STEP_RE = re.compile(r"^step-(\d{8})\.pt$")


# --- RNG state in weights_only-loadable form (tensors, ints, lists only) --------------------------


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    if not state:
        return
    py = state["python"]
    random.setstate((py[-1], tuple(py[:-1]), None))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- the training state: to and from the checkpoint dict ------------------------------------------


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class TrainState:
    """Where a run is: counters that go into the checkpoint next to the weights."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (per rank)
    best_accuracy: float = -1.0
    skipped_total: int = 0


# checkpoint key -> the component whose state_dict it holds; restored in this order (the head after the
# optimizer: optimizer.load_state_dict replaces the state the head's per-class rows go into)
STATE_KEYS = ("optimizer", "head_state", "scaler", "scheduler")


def training_checkpoint(
    backbone_spec: Mapping[str, Any],
    backbone: nn.Module,
    parts: Mapping[str, Stateful],
    state: TrainState,
    rngs: list[dict[str, Any]],
    config: dict[str, Any],
    metrics: Mapping[str, Any],
    teacher: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The whole training checkpoint: `parts` maps each of STATE_KEYS to its component; `teacher`
    the distillation teacher's path and sha256 (trainer/distill.py), None without one."""
    extra: dict[str, Any] = {key: parts[key].state_dict() for key in STATE_KEYS}
    extra.update(
        {
            "step": state.step,
            "epoch": state.epoch,
            "data_position": {"epoch": state.epoch, "batch": state.batch_in_epoch},
            "rng": {"per_rank": rngs},
            "config": config,
            "teacher": dict(teacher) if teacher is not None else None,
            "metrics": {
                "best_accuracy": state.best_accuracy,
                "skipped_total": state.skipped_total,
                **metrics,
            },
        }
    )
    return checkpoint_dict(backbone_spec, backbone.state_dict(), **extra)


def restore_training(ckpt: dict[str, Any], backbone: nn.Module, parts: Mapping[str, Stateful]) -> TrainState:
    """Load weights and component states from a training checkpoint; returns its counters.
    Call `check_resumable` first: it turns the mismatches a load would trip over into one line."""
    backbone.load_state_dict(ckpt["backbone_state"])
    for key in STATE_KEYS:
        parts[key].load_state_dict(ckpt[key])
    metrics = ckpt["metrics"]
    return TrainState(
        step=int(ckpt["step"]),
        epoch=int(ckpt["epoch"]),
        batch_in_epoch=int(ckpt["data_position"]["batch"]),
        best_accuracy=float(metrics.get("best_accuracy", -1.0)),
        skipped_total=int(metrics.get("skipped_total", 0)),
    )


def _nonfinite_tensor(tree: Any, where: str) -> str | None:
    """The path of the first floating-point tensor in a (nested) state dict holding NaN or inf."""
    if isinstance(tree, torch.Tensor):
        ok = not tree.is_floating_point() or bool(torch.isfinite(tree).all())
        return None if ok else where
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        found = _nonfinite_tensor(value, f"{where}.{key}")
        if found is not None:
            return found
    return None


def unusable_reason(ckpt: Mapping[str, Any]) -> str | None:
    """Why training must not continue from `ckpt` (saved by the divergence guard, or any weight or
    optimizer tensor NaN/inf), or None. A resume from such a state only repeats the divergence."""
    if ckpt.get("metrics", {}).get("diverged"):
        return "it holds the state of a diverged run"
    for key in ("backbone_state", *STATE_KEYS):
        where = _nonfinite_tensor(ckpt.get(key), key)
        if where is not None:
            return f"{where} holds NaN or infinity"
    return None


ABSORBED = (
    "optim.*, schedule.*, head.s/m/t/parallel/sample_rate/grad_dtype (not the class count), the "
    "process count with loader.batch_size x processes kept, loader.workers/backend/prefetch, "
    "optim.accumulate, checkpoint.*, validation.*, logging.*"
)


def check_resumable(
    path: Path,
    ckpt: dict[str, Any],
    backbone_spec: Mapping[str, Any],
    num_classes: int,
    batch_size: int,
    world_size: int,
) -> None:
    """UserError in one line when this run cannot continue `ckpt`: says what differs and what a resume
    absorbs. The head is saved per class, so any process count resumes it; the data position counts
    batches of batch_size x processes samples (the same samples for every process count, see
    shards/sample_index.py), so that product must stay."""
    if "optimizer" not in ckpt:
        raise UserError(f"{path}: an embedding-only checkpoint cannot resume training")
    diffs = []
    saved, now = ckpt.get("model", {}), model_spec(backbone_spec)
    for key in ("backbone", "embedding_size", "image_size", "kwargs"):
        if saved.get(key) != now[key]:
            diffs.append(f"model {key} {saved.get(key)!r} -> {now[key]!r}")
    head = ckpt.get("head_state", {})
    if "rows" not in head:
        raise UserError(
            f"{path}: cannot resume: its head was saved whole, before per-class head "
            "checkpoints; resume it with the version that wrote it or start afresh"
        )
    saved_classes = int(head["num_classes"]) // int(head.get("subcenters", 1))  # rows per class
    if saved_classes != num_classes:
        diffs.append(f"classes {saved_classes} -> {num_classes}")
    saved_world = len(ckpt.get("rng", {}).get("per_rank", [])) or world_size
    saved_batch = int(ckpt.get("config", {}).get("loader", {}).get("batch_size", batch_size))
    if saved_batch * saved_world != batch_size * world_size:
        keep = _keep_global_batch(saved_batch * saved_world, world_size)
        diffs.append(
            f"loader.batch_size x processes {saved_batch} x {saved_world} -> "
            f"{batch_size} x {world_size} ({keep})"
        )
    if diffs:
        raise UserError(
            f"{path}: cannot resume: {'; '.join(diffs)}. A resume keeps the model, the class "
            f"count and loader.batch_size x processes; it absorbs changes to {ABSORBED}. "
            "To start afresh: checkpoint.resume=never or another run.dir"
        )


def _keep_global_batch(global_batch: int, world_size: int) -> str:
    """The override that resumes on `world_size` processes (after losing a GPU, say) with the saved
    global batch, or the nearest smaller process count that can keep it."""
    fits = max(n for n in range(1, world_size + 1) if global_batch % n == 0)
    keep = f"loader.batch_size={global_batch // fits}"
    if fits == world_size:
        return f"to keep the global batch of {global_batch} on {world_size} process(es), resume with {keep}"
    return (
        f"the global batch of {global_batch} does not split over {world_size} processes; resume on "
        f"{fits} with {keep}"
    )


# --- the run folder: rotation and resume ----------------------------------------------------------


class CheckpointDir:
    """The checkpoints of one run: writes step files, last.pt, best.pt; finds the newest to resume."""

    def __init__(self, root: Path | str, keep_last: int = 3) -> None:
        self.root = Path(root)
        self.keep_last = max(1, int(keep_last))

    def step_files(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_RE.match(p.name))]
        return sorted(found)

    def save(
        self, ckpt: dict[str, Any], step: int, best: bool = False, on_written: WrittenFn | None = None
    ) -> Path:
        """Write step-XXXXXXXX.pt, then last.pt (and best.pt), then prune old step files."""
        path = self.root / f"step-{step:08d}.pt"
        atomic_save(ckpt, path, on_written)
        # last/best are hard links when possible (no second copy on disk), written atomically too.
        for name, wanted in (("last.pt", True), ("best.pt", best)):
            if wanted:
                self._link_or_copy(path, self.root / name, ckpt)
        for _, old in self.step_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        for tmp in self.root.glob("*.tmp.*"):
            tmp.unlink(missing_ok=True)
        return path

    def _link_or_copy(self, src: Path, dst: Path, ckpt: dict[str, Any]) -> None:
        tmp = dst.with_name(f"{dst.name}.tmp.{os.getpid()}")
        try:
            tmp.unlink(missing_ok=True)
            os.link(src, tmp)
        except OSError:
            atomic_save(ckpt, dst)
            return
        os.replace(tmp, dst)
        fsync_dir(self.root)

    def clean_partial(self) -> list[Path]:
        """Remove temp files a killed writer left behind; returns what was removed."""
        removed = []
        if self.root.is_dir():
            for p in list(self.root.glob("*.tmp")) + list(self.root.glob("*.tmp.*")):
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    def newest_complete(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads and can be trained on (`unusable_reason`), trying step
        files newest first, then last.pt; each one passed over is a warning line."""
        candidates = [p for _, p in reversed(self.step_files())] + [self.root / "last.pt"]
        for path in candidates:
            if not path.is_file():
                continue
            try:
                ckpt = load_checkpoint(path)
            except UserError as err:
                print(f"warning: skipping {err}", file=sys.stderr)
                continue
            reason = unusable_reason(ckpt)
            if reason is None:
                return path, ckpt
            print(f"warning: not resuming from {path}: {reason}", file=sys.stderr)
        return None
