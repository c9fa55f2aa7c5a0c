"""Knowledge distillation (`distill.*`): a frozen teacher embeds the same images as the student, and
the distance between their unit-length embeddings, times `distill.weight`, is added to the margin loss.

The teacher is any model file the one loader reads (models/load.py). A checkpoint's network runs on
the student's device under the student's autocast, in eval mode, its parameters frozen, under
`torch.no_grad` (not inference mode: its output enters a loss whose backward saves it). An ONNX or
OpenVINO file runs in the loader's runtime (auto: OpenVINO on the CPU when installed), in float32,
and its embeddings are moved to the student's device. Every process (DDP rank) loads its own copy:
the term is each rank's mean over its own images, so DDP's averaging makes it the global batch's.

The teacher must give embeddings of the student's size (no projection: a learnt one would be a
second student, and a fixed one would decide for the user what to distil), take faces of the data's
size, and state no input contract other than the data's (models/model_file.py INPUT_SPEC).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from common.cli import UserError
from models.load import LoadedModel, load_model


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """The batch mean of the distance between the unit-length rows of `student` and `teacher`, in
    fp32: "cosine" 1 - cos(s, t); "l2" |s - t|^2 (= 2 - 2 cos(s, t) on unit vectors)."""
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.float(), dim=1)
    if kind == "cosine":
        return (1.0 - (s * t).sum(dim=1)).mean()
    if kind == "l2":
        return (s - t).pow(2).sum(dim=1).mean()
    raise ValueError(f"unknown distillation loss {kind!r}")


class Teacher:
    """The frozen teacher of one process: `embed(images, autocast)` -> (N, D) fp32 on their device."""

    def __init__(
        self, path: str, device: torch.device, embedding_size: int, image_size: tuple[int, int]
    ) -> None:
        try:
            model = load_model(path, device)
            model.check_size(image_size, "the training data")
            model.check_input_spec("the training data")
        except UserError as err:
            raise UserError(f"distill.teacher: {err}") from None
        self.model: LoadedModel = model
        self.device = device
        self.module = model.module
        if self.module is not None:
            self.module.requires_grad_(False).eval()
        size = model.embedding_size or self._probe_size(image_size)
        if size != embedding_size:
            raise UserError(
                f"distill.teacher: {path}: the teacher's embeddings have {size} dimensions, this "
                f"run's model.embedding_size is {embedding_size} (a teacher of the same size is needed)"
            )
        self.sha256 = model.fingerprint()

    def _probe_size(self, image_size: tuple[int, int]) -> int:
        """The width of the embeddings of a file that does not record it: one black image through it."""
        return int(self.model.embed(torch.zeros(1, 3, *image_size)).shape[-1])

    def embed(self, images: torch.Tensor, autocast: Any) -> torch.Tensor:
        """The teacher's embeddings of `images`, fp32, on the images' device, outside autograd."""
        with torch.no_grad():
            if self.module is not None:
                with autocast:
                    return self.module(images).float()
            out = self.model.embed(images.detach().float().cpu().contiguous())
            return torch.from_numpy(out).to(images.device, non_blocking=True)

    def record(self) -> dict[str, str]:
        """What a checkpoint notes of the teacher: its path and the sha256 of its weights."""
        return {"path": str(self.model.path), "sha256": self.sha256}


def check_same_teacher(where: Any, saved: Mapping[str, str] | None, now: Mapping[str, str] | None) -> None:
    """UserError in one line when a resume would change the teacher the checkpoint `where` was
    trained with (by its weights' digest; a moved file is the same teacher); None: no teacher."""
    if (saved or {}).get("sha256") == (now or {}).get("sha256"):
        return

    def said(teacher: Mapping[str, str] | None) -> str:
        return f"{teacher['path']} (sha256 {teacher['sha256'][:12]})" if teacher else "no teacher"

    raise UserError(
        f"{where}: cannot resume: it was trained with {said(saved)}, this run has {said(now)} "
        "(distill.teacher); set distill.teacher to its teacher, or start afresh: "
        "checkpoint.resume=never or another run.dir"
    )
