"""The one flip rule of the evaluators, for a model of models/load.py (checkpoint, ONNX or OpenVINO).

Flip test-time augmentation: each batch goes through the model together with its mirror image (one
forward of 2B), the two embeddings are added and the sum L2-normalized. `flip_embed` applies it to
a model-ready batch (eval/identification/faces.py, eval/ijb.py); eval/verification/embed_keys.py
builds the 2B batch from decoded faces with `flip_input` in its decode thread and folds the model's
output with `flip_output`.
"""

from __future__ import annotations

import numpy as np
import torch

from models.load import EmbedFn


def flip_input(faces: np.ndarray, flip: bool = True) -> torch.Tensor:
    """uint8 RGB faces [B, H, W, 3] -> the model input [B, 3, H, W] float32, x / 127.5 - 1 (the
    values of shards.torch_pipeline.to_model_input, bit for bit), followed by the mirror images when
    flip [2B, ...]. Built in numpy in one buffer by the calling thread: torch's ops would wake its
    intra-op threads for each small step, on cores the model is using."""
    n = len(faces)
    out = np.empty((2 * n if flip else n, 3, *faces.shape[1:3]), np.float32)
    x = out[:n]
    np.divide(faces.transpose(0, 3, 1, 2), np.float32(127.5), out=x, dtype=np.float32)
    np.subtract(x, np.float32(1), out=x)
    if flip:
        out[n:] = x[..., ::-1]
    return torch.from_numpy(out)


def flip_output(emb: np.ndarray, n: int, flip: bool = True) -> np.ndarray:
    """The model's embeddings of a `flip_input` batch of n faces -> the L2-normalized sum of each
    face's and its mirror's embedding (float32 [n, D]; without flip, the face's own)."""
    if flip:
        emb = emb[:n] + emb[n:]
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb.astype(np.float32, copy=False)


def flip_embed(embed: EmbedFn, images: torch.Tensor, flip: bool = True) -> np.ndarray:
    """The flip rule for a model-ready batch (float32 [B, 3, H, W]): the batch and its mirror image
    in one forward, the two embeddings added, the sum L2-normalized (float32 [B, D])."""
    both = torch.cat([images, torch.flip(images, dims=[3])]) if flip else images
    return flip_output(embed(both), len(images), flip)
