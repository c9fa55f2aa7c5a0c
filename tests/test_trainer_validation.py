"""In-training LFW validation: pair scores from embeddings and the k-fold threshold accuracy."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shards.manifest import Manifest, Pair
from trainer.validation import _simple_metrics, validate


def test_internal_metric_separable_and_random():
    same = np.array([True, False] * 50)
    folds = np.repeat(np.arange(10), 10)
    assert _simple_metrics(np.where(same, 0.9, 0.1), same, folds)["accuracy_mean"] == 1.0
    rng = np.random.default_rng(0)
    assert 0.3 < _simple_metrics(rng.random(100), same, folds)["accuracy_mean"] < 0.7


def test_validate_embeds_every_sample_and_scores_pairs(monkeypatch):
    # Four samples: two identities; the "model" maps each image to its identity's direction.
    keys = ["a1", "a2", "b1", "b2"]
    images = torch.zeros(4, 3, 8, 8)
    images[:2, 0] = 1.0
    images[2:, 1] = 1.0

    def fake_batches(manifest, batch_size=256, workers=0):
        for i in range(0, 4, batch_size):
            chunk = keys[i : i + batch_size]
            yield chunk, images[i : i + batch_size], torch.zeros(len(chunk))

    monkeypatch.setitem(sys.modules, "shards.loader", types.SimpleNamespace(iter_eval_batches=fake_batches))
    pairs = [Pair("a1", "a2", True, f) for f in range(2)] + [Pair("a1", "b1", False, f) for f in range(2)]
    pairs += [Pair("b1", "b2", True, f) for f in range(2)] + [Pair("a2", "b2", False, f) for f in range(2)]
    manifest = Manifest(Path("."), "lfw", "test", 4, 2, ["a", "b"], (8, 8), [], pairs)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    res = validate(model, manifest, batch_size=3, device=torch.device("cpu"), autocast_dtype=None,
                   channels_last=False)
    assert res["accuracy_mean"] == 1.0
