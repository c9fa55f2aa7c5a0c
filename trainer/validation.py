"""LFW-protocol validation during training, on the LFW shards named in the config."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from shards.errors import UserError
from shards.manifest import Manifest, load_manifest


def open_lfw(path: str) -> Manifest:
    manifest = load_manifest(path)
    if not manifest.pairs:
        raise UserError(f"{manifest.root}: validation.lfw_shards has no pairs "
                        "(build it with the lfw command)")
    return manifest


def _simple_metrics(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> dict[str, float]:
    """k-fold best-threshold accuracy; used only until eval.verification is available."""
    accs = []
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        cands = np.unique(scores[train])
        best = max(cands, key=lambda t: np.mean((scores[train] >= t) == same[train]))
        accs.append(float(np.mean((scores[test] >= best) == same[test])))
    return {"accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs))}


def _metric_fn():  # noqa: ANN202
    try:
        from eval.verification import verification_metrics
    except ImportError:
        return _simple_metrics
    return verification_metrics


@torch.no_grad()
def embed_all(model: nn.Module, manifest: Manifest, batch_size: int, device: torch.device,
              autocast_dtype: torch.dtype | None, channels_last: bool) -> tuple[np.ndarray, dict[str, int]]:
    from shards.loader import iter_eval_batches

    was_training = model.training
    model.eval()
    feats, index_of = [], {}
    for keys, images, _ in iter_eval_batches(manifest, batch_size=batch_size):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        dtype = autocast_dtype or torch.float32
        with torch.autocast(device.type, dtype=dtype, enabled=autocast_dtype is not None):
            emb = model(images)
        emb = torch.nn.functional.normalize(emb.float(), dim=1)
        for k in keys:
            index_of[k] = len(index_of)
        feats.append(emb.cpu().numpy())
    model.train(was_training)
    return np.concatenate(feats), index_of


def validate(model: nn.Module, manifest: Manifest, batch_size: int, device: torch.device,
             autocast_dtype: torch.dtype | None, channels_last: bool) -> dict[str, Any]:
    emb, index_of = embed_all(model, manifest, batch_size, device, autocast_dtype, channels_last)
    pairs = [p for p in manifest.pairs or [] if p.a in index_of and p.b in index_of]
    if not pairs:
        raise UserError(f"{manifest.root}: none of the LFW pairs' samples are in the shards")
    a = np.array([index_of[p.a] for p in pairs])
    b = np.array([index_of[p.b] for p in pairs])
    scores = np.sum(emb[a] * emb[b], axis=1)
    same = np.array([p.same for p in pairs], dtype=bool)
    folds = np.array([p.fold for p in pairs])
    return _metric_fn()(scores, same, folds)
