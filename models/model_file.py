"""The embedding model file: the model part of a facetrain checkpoint, written and read here.

A checkpoint (docs/CONTRACTS.md) is one torch.save'd dict: the header (`format`, `version`), the
model (`model`: backbone name, kwargs, image size, embedding size; `backbone_state`: its weights)
and `metrics`; a training checkpoint adds the resume state (trainer/checkpoint.py). What eval/,
the ONNX export and identification read is the model part: `read_model_file` loads the file with
`mmap=True`, so the optimizer and head states stay on disk (never read, never in memory). Measured
on an ir50 checkpoint with SGD momentum and an 8,631-class head (367 MiB, warm page cache, 2 busy
cores): the model rebuilt in 2.1-2.5 s and +338 MiB resident, against 2.6-3.1 s and +539 MiB
through a full load.
Every write goes to `<name>.tmp`, is fsync'ed and renamed (`atomic_save`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from common.cli import UserError
from common.fileio import atomic_write
from models.backbones import build_backbone

FORMAT = "facetrain-checkpoint"
VERSION = 1

# The input every embedding model takes (docs/CONTRACTS.md, "Model input"); eval/export_onnx.py
# records it in the ONNX metadata.
INPUT_SPEC = {
    "layout": "NCHW",
    "color": "RGB",
    "dtype": "float32",
    "normalization": "(pixel / 255 - 0.5) / 0.5",
}

# Called with the open temp file after the checkpoint is written into it, before fsync and rename
# (the crash tests hold a half-written file there; see trainer/hooks.py).
WrittenFn = Callable[[IO[bytes]], None]


def atomic_save(obj: Any, path: Path | str, on_written: WrittenFn | None = None) -> None:
    """torch.save through `common.fileio.atomic_write`: `path.tmp`, fsync, rename."""
    with atomic_write(path, "wb", what="checkpoint") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as err:
            # A failed write (disk full) surfaces from torch's zip writer as a RuntimeError chained
            # to the OSError: hand atomic_write the OSError, which it turns into one line.
            cause = err.__cause__ or err.__context__
            if isinstance(cause, OSError):
                raise cause from None
            raise
        if on_written is not None:
            on_written(f)


def load_checkpoint(path: Path | str, mmap: bool = False) -> dict[str, Any]:
    """The whole checkpoint dict (CPU tensors), loaded with weights_only=True and checked. With
    `mmap`, tensors are views of the file: only the ones used are ever read from disk."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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


def model_spec(backbone_spec: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's "model" entry: what `load_embedding_model` rebuilds the backbone from."""
    return {
        "backbone": str(backbone_spec["backbone"]),
        "embedding_size": int(backbone_spec["embedding_size"]),
        "image_size": [int(v) for v in backbone_spec.get("image_size", (112, 112))],
        "kwargs": dict(backbone_spec.get("kwargs", {})),
    }


def checkpoint_dict(
    backbone_spec: Mapping[str, Any], backbone_state: Mapping[str, torch.Tensor], **extra: Any
) -> dict[str, Any]:
    """The one place a checkpoint dict is laid out (docs/CONTRACTS.md): header, model, weights, extra."""
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_spec(backbone_spec),
        "backbone_state": {k: v.detach().cpu() for k, v in backbone_state.items()},
    }
    ckpt.update(extra)
    return ckpt


def save_embedding_checkpoint(
    path: Path | str, backbone_spec: dict, backbone_state: dict, **extra: Any
) -> None:
    """Write a checkpoint that `load_embedding_model` can rebuild; `extra` adds the training state keys."""
    atomic_save(checkpoint_dict(backbone_spec, backbone_state, **extra), path)


@dataclass
class ModelFile:
    """The model part of a checkpoint: spec, weights (views of the file) and the stored metrics."""

    path: Path
    spec: dict[str, Any]
    state: dict[str, torch.Tensor]
    metrics: dict[str, Any]

    @property
    def threshold(self) -> float | None:
        """The verification threshold the run's validation chose, if it stored one. The trainer
        stores its first validator's metrics unprefixed, the others' as "<name>_<key>"."""
        value = self.metrics.get("threshold", self.metrics.get("lfw_threshold"))
        return as_threshold(value)

    def check_finite(self) -> None:
        """UserError when any weight is NaN or infinite: what a diverged run saves. Every command
        that reads a model builds it here, so none writes a gallery or an export from such weights."""
        bad = [k for k, v in self.state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise UserError(
                f"{self.path}: {len(bad)} of {len(self.state)} weight tensors are NaN or infinite "
                f"(first: {bad[0]!r}); the run that saved it diverged"
            )

    def build(self, map_location: str | torch.device = "cpu") -> nn.Module:
        """The backbone the spec describes with these weights (all finite), on `map_location`, eval mode."""
        self.check_finite()
        spec, path = self.spec, self.path
        try:
            model = build_backbone(
                spec["backbone"], spec["embedding_size"], tuple(spec["image_size"]), **spec.get("kwargs", {})
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path}: cannot rebuild backbone {spec.get('backbone')!r} ({err})") from None
        try:
            model.load_state_dict(self.state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else "mismatch"
            raise UserError(f"{path}: weights do not fit backbone {spec['backbone']!r} ({first})") from None
        return model.to(map_location).eval()


def as_threshold(value: object) -> float | None:
    """A cosine threshold in [-1, 1], or None for anything else."""
    return float(value) if isinstance(value, (int, float)) and -1.0 <= float(value) <= 1.0 else None


def read_model_file(path: Path | str) -> ModelFile:
    """The model part of a checkpoint, the rest left unread on disk (mmap); UserError naming the file."""
    path = Path(path)
    ckpt = load_checkpoint(path, mmap=True)
    spec = ckpt.get("model")
    if not isinstance(spec, dict) or "backbone" not in spec or "backbone_state" not in ckpt:
        raise UserError(f"{path}: checkpoint has no embedding model ('model' / 'backbone_state' missing)")
    metrics = ckpt.get("metrics")
    return ModelFile(path, spec, ckpt["backbone_state"], metrics if isinstance(metrics, dict) else {})


def load_embedding_model(
    path: Path | str, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Rebuild the backbone a checkpoint describes, load its weights, eval mode."""
    model_file = read_model_file(path)
    return model_file.build(map_location), model_file.spec
