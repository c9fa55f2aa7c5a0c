"""eval/verify.py's figures do not depend on how the model runs: onnxruntime or OpenVINO, one face
a forward or many, one batch at a time or several at once; and eval/embed.py's batch building is
the flip rule of `flip_embed`, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.embed import flip_embed, flip_input, flip_output
from eval.verify import main as verify_main
from shards.torch_pipeline import to_model_input
from tests._eval_util import build_lfw_shards, make_onnx

EXACT = ("accuracy_mean", "accuracy_std", "same_accuracy", "diff_accuracy", "tar_at_far_1e-3")


def test_flip_input_is_to_model_input_then_its_mirror() -> None:
    faces = np.random.default_rng(0).integers(0, 256, (5, 16, 12, 3), dtype=np.uint8)
    x = to_model_input(torch.from_numpy(faces), torch.device("cpu"), False)
    assert torch.equal(flip_input(faces, flip=False), x)
    assert torch.equal(flip_input(faces), torch.cat([x, torch.flip(x, dims=[3])]))

    def embed(images: torch.Tensor) -> np.ndarray:  # a left-right asymmetric "model"
        return images[:, 0, :, :6].flatten(1).numpy() * np.arange(1, 6 * 16 + 1, dtype=np.float32)

    for flip in (True, False):
        got = flip_output(embed(flip_input(faces, flip)), len(faces), flip)
        np.testing.assert_array_equal(got, flip_embed(embed, x, flip))
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_figures_are_the_same_for_every_runtime_batch_size_and_parallel(tmp_path: Path) -> None:
    onnx = make_onnx(tmp_path / "tiny.onnx")
    shards = build_lfw_shards(tmp_path / "lfw")
    runs = {
        "onnxruntime, 1 face a forward, 1 at a time": [
            "--runtime",
            "onnxruntime",
            "--batch-size",
            "1",
            "--parallel",
            "1",
        ],
        "onnxruntime, defaults": ["--runtime", "onnxruntime"],
        "auto (OpenVINO), defaults": [],
        "OpenVINO, 7 faces a forward, 3 at once": [
            "--runtime",
            "openvino",
            "--batch-size",
            "7",
            "--parallel",
            "3",
        ],
    }
    figures = {}
    for name, extra in runs.items():
        out = tmp_path / "m.json"
        argv = ["--onnx", str(onnx), "--sets", f"lfw={shards}", "--json", str(out), "--quiet", *extra]
        assert verify_main(argv) == 0, name
        figures[name] = json.loads(out.read_text())["sets"]["lfw"]
    first, reference = next(iter(figures.items()))
    assert 0.6 < reference["accuracy_mean"] < 0.95  # an imperfect model: the figures can move
    for name, got in figures.items():
        for key in EXACT:
            assert got[key] == reference[key], (name, first, key)
        assert got["auc"] == pytest.approx(reference["auc"], abs=1e-6), name
        assert got["threshold"] == pytest.approx(reference["threshold"], abs=1e-5), name
