"""Checkpoints: the dict layout of docs/CONTRACTS.md, atomic writes, rotation and auto-resume.

Files in `<run>/checkpoints/`: `step-XXXXXXXX.pt` (the last K kept), `last.pt` (the newest),
`best.pt` (best validation accuracy), `untrained.pt` (before the first step, when asked).
Every write goes to `<name>.tmp`, is fsync'ed and renamed, so a reader (or a resumed run after
`kill -9`) only ever sees complete files; leftover `.tmp` files are ignored and cleaned up.
"""

from __future__ import annotations

import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shards.errors import UserError
from trainer.backbones import build_backbone

FORMAT = "facetrain-checkpoint"
VERSION = 1
_STEP_RE = re.compile(r"^step-(\d{8})\.pt$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path | str, _pause_s: float = 0.0) -> None:
    """torch.save to `path.tmp`, fsync, rename. `_pause_s` (tests only) widens the window in which a
    kill leaves a half-written temp file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        if _pause_s > 0:
            half = max(1, f.tell() // 2)
            f.truncate(half)  # looks exactly like a write cut short, for the crash test
            f.flush()
            time.sleep(_pause_s)
            f.seek(0)
            torch.save(obj, f)
            f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _load(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint file not found") from None
    except Exception as err:  # truncated zip, pickle refused by weights_only, not a torch file ...
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}: {first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a {FORMAT} file")
    if ckpt.get("version") != VERSION:
        raise UserError(f"{path}: checkpoint version {ckpt.get('version')!r}, this tool reads {VERSION}")
    return ckpt


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """The whole checkpoint dict (CPU tensors), loaded with weights_only=True and checked."""
    return _load(Path(path))


def save_embedding_checkpoint(
    path: Path | str, backbone_spec: dict, backbone_state: dict, **extra: Any
) -> None:
    """Write a checkpoint that `load_embedding_model` can rebuild; `extra` adds the training state keys."""
    spec = {
        "backbone": str(backbone_spec["backbone"]),
        "embedding_size": int(backbone_spec["embedding_size"]),
        "image_size": [int(v) for v in backbone_spec.get("image_size", (112, 112))],
        "kwargs": dict(backbone_spec.get("kwargs", {})),
    }
    pause = float(extra.pop("_pause_s", 0.0))
    ckpt = {"format": FORMAT, "version": VERSION, "model": spec,
            "backbone_state": {k: v.detach().cpu() for k, v in backbone_state.items()}}
    ckpt.update(extra)
    atomic_save(ckpt, path, _pause_s=pause)


def load_embedding_model(
    path: Path | str, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Rebuild the backbone a checkpoint describes, load its weights, eval mode."""
    path = Path(path)
    ckpt = _load(path)
    spec = ckpt.get("model")
    if not isinstance(spec, dict) or "backbone" not in spec or "backbone_state" not in ckpt:
        raise UserError(f"{path}: checkpoint has no embedding model ('model' / 'backbone_state' missing)")
    try:
        model = build_backbone(spec["backbone"], spec["embedding_size"], tuple(spec["image_size"]),
                               **spec.get("kwargs", {}))
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: cannot rebuild backbone {spec.get('backbone')!r} ({err})") from None
    try:
        model.load_state_dict(ckpt["backbone_state"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "mismatch"
        raise UserError(f"{path}: weights do not fit backbone {spec['backbone']!r} ({first})") from None
    model.to(map_location).eval()
    return model, spec


# --- RNG state in weights_only-loadable form (tensors, ints, lists only) --------------------------

def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
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

    def save(self, ckpt: dict[str, Any], step: int, best: bool = False, pause_s: float = 0.0) -> Path:
        """Write step-XXXXXXXX.pt, then last.pt (and best.pt), then prune old step files."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"step-{step:08d}.pt"
        atomic_save(ckpt, path, _pause_s=pause_s)
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
        _fsync_dir(self.root)

    def clean_partial(self) -> list[Path]:
        """Remove temp files a killed writer left behind; returns what was removed."""
        removed = []
        if self.root.is_dir():
            for p in list(self.root.glob("*.tmp")) + list(self.root.glob("*.tmp.*")):
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    def newest_complete(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads and checks out, trying step files newest first, then last.pt."""
        candidates = [p for _, p in reversed(self.step_files())] + [self.root / "last.pt"]
        for path in candidates:
            if not path.is_file():
                continue
            try:
                return path, _load(path)
            except UserError as err:
                print(f"warning: skipping {err}", file=sys.stderr)
        return None
