"""The one flip rule of the evaluators, for a model of models/load.py (checkpoint or ONNX).

Flip test-time augmentation (`flip_embed`, the one flip rule; eval/verification/embed_keys.py,
eval/identification/faces.py and eval/ijb.py use it): each batch goes through the model together with
its mirror image (one forward of 2B), the two embeddings are added and the sum L2-normalized.
"""

from __future__ import annotations

import numpy as np
import torch

from models.load import EmbedFn


def flip_embed(embed: EmbedFn, images: torch.Tensor, flip: bool = True) -> np.ndarray:
    """The flip rule of every evaluator: the batch and its mirror image in one forward, the two
    embeddings added, the sum L2-normalized (float32 [B, D])."""
    if flip:
        both = embed(torch.cat([images, torch.flip(images, dims=[3])]))
        emb = both[: len(images)] + both[len(images) :]
    else:
        emb = embed(images)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb.astype(np.float32, copy=False)
