"""Embedding every face of a shard folder once, with a model of models/load.py (checkpoint or ONNX).

Flip test-time augmentation (`flip_embed`, the one flip rule; eval/embed_keys.py and eval/ijb.py use
it too): each batch goes through the model together with its mirror image (one forward of 2B), the
two embeddings are added and the sum L2-normalized.
"""

from __future__ import annotations

import numpy as np
import torch

from common.cli import UserError, progress
from models.load import EmbedFn
from shards.manifest import Manifest


def flip_embed(embed: EmbedFn, images: torch.Tensor, flip: bool = True) -> np.ndarray:
    """The flip rule of every evaluator: the batch and its mirror image in one forward, the two
    embeddings added, the sum L2-normalized (float32 [B, D])."""
    if flip:
        both = embed(torch.cat([images, torch.flip(images, dims=[3])]))
        emb = both[: len(images)] + both[len(images):]
    else:
        emb = embed(images)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb.astype(np.float32, copy=False)


def embed_shards(
    embed: EmbedFn, manifest: Manifest, *, batch_size: int = 128, flip: bool = True,
    workers: int = 0, show_progress: bool = True,
) -> tuple[np.ndarray, dict[str, int]]:
    """(L2-normalized embeddings [N, D] float32, key -> row) for every sample, in shard order."""
    from shards.loader import iter_eval_batches  # imported late: it pulls in the reader stack

    feats: list[np.ndarray] = []
    index_of: dict[str, int] = {}
    with progress("[bold]{task.description}") as bar:
        task = bar.add_task("embedding", total=manifest.num_samples, visible=show_progress)
        for keys, images, _ in iter_eval_batches(manifest, batch_size=batch_size, workers=workers):
            feats.append(flip_embed(embed, images, flip))
            for k in keys:
                if k in index_of:
                    raise UserError(f"{manifest.root}: sample key {k!r} appears twice in the shards")
                index_of[k] = len(index_of)
            bar.update(task, completed=len(index_of))
    if not feats:
        raise UserError(f"{manifest.root}: the shards hold no samples")
    return np.concatenate(feats), index_of
