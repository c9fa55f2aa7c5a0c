"""`model.init_from`: start the backbone from the weights of an embedding-model file (e.g. one
eval/import_insightface.py wrote) or of a training checkpoint; the head starts new (fine-tuning on
other identities). A file whose model is not the configured one is one line naming both."""

from __future__ import annotations

from typing import Any

from torch import nn

from common.cli import UserError
from models.model_file import read_model_file


def init_backbone(backbone: nn.Module, spec: dict[str, Any], path: str) -> None:
    """Load the file's backbone weights into `backbone`, built from this run's `spec`."""
    where = f"model.init_from={path}"
    try:
        model_file = read_model_file(path)
        model_file.check_finite()  # a diverged run's weights would start this run diverged
    except UserError as err:
        raise UserError(f"model.init_from: {err}") from None
    theirs = model_file.spec
    ours_said = f"{spec['backbone']} at embedding_size {spec['embedding_size']}"
    theirs_said = f"{theirs.get('backbone')} at embedding_size {theirs.get('embedding_size')}"
    if theirs_said != ours_said:
        raise UserError(
            f"{where}: the file holds {theirs_said}, this run builds {ours_said} "
            "(set model.backbone and model.embedding_size to the file's)"
        )
    try:
        backbone.load_state_dict(model_file.state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "mismatch"
        raise UserError(
            f"{where}: its weights do not fit this run's {spec['backbone']} (file: image size "
            f"{theirs.get('image_size')}, kwargs {theirs.get('kwargs', {})}; run: image size "
            f"{spec['image_size']}, kwargs {spec['kwargs']}): {first}"
        ) from None
