"""Small hand-built LFW shards and tiny checkpoints for the evaluator tests (eval/lfw.py, ONNX)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from models.backbones import build_backbone
from models.model_file import save_embedding_checkpoint
from shards.format import FORMAT_NAME, FORMAT_VERSION, sample_key, scaled_template
from shards.manifest import write_manifest
from shards.writer import ShardWriter

NAMES = [f"Person_{c}" for c in "ABCDEFGHIJKL"]  # 12 identities x 3 images
SIZE = (112, 112)
# the Metrics JSON of docs/CONTRACTS.md, as every evaluator writes it
METRIC_KEYS = {
    "accuracy_mean",
    "accuracy_std",
    "same_accuracy",
    "diff_accuracy",
    "auc",
    "threshold",
    "tar_at_far_1e-3",
    "num_pairs",
    "seconds",
}


def _face(rng: np.random.Generator, ident: int) -> np.ndarray:
    """A coarse random pattern per identity (high contrast, so cosine scores spread) plus noise."""
    coarse = np.random.default_rng(1000 + ident).integers(0, 256, size=(6, 6, 3)).astype(np.uint8)
    base = cv2.resize(coarse, SIZE[::-1], interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0, 12, size=(*SIZE, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def build_lfw_shards(out: Path, seed: int = 0) -> Path:
    """36 faces over 2 shards, 60 pairs in 10 folds (3 genuine + 3 impostor each)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    samples = []
    for label, name in enumerate(NAMES):
        for i in (1, 2, 3):
            rel = f"{name}/{name}_{i:04d}.jpg"
            ok, jpg = cv2.imencode(".jpg", _face(rng, label), [cv2.IMWRITE_JPEG_QUALITY, 95])
            assert ok
            samples.append(
                (
                    sample_key(rel),
                    jpg.tobytes(),
                    label,
                    {"identity": name, "label": label, "source": rel, "landmarks": [[0, 0]] * 5},
                )
            )
    order = rng.permutation(len(samples))
    infos = []
    for s, chunk in enumerate(np.array_split(order, 2)):
        w = ShardWriter(out / f"lfw-{s:06d}.tar")
        for j in chunk:
            w.add(*samples[j])
        infos.append(w.close())
    pairs = []
    for f in range(10):
        for k in range(3):
            n = NAMES[(f + k) % 12]
            pairs.append(
                {
                    "a": sample_key(f"{n}/{n}_0001.jpg"),
                    "b": sample_key(f"{n}/{n}_000{2 + k % 2}.jpg"),
                    "same": True,
                    "fold": f,
                }
            )
        for k in range(3):
            n1, n2 = NAMES[(f + k) % 12], NAMES[(f + k + 5) % 12]
            pairs.append(
                {
                    "a": sample_key(f"{n1}/{n1}_0001.jpg"),
                    "b": sample_key(f"{n2}/{n2}_0003.jpg"),
                    "same": False,
                    "fold": f,
                }
            )
    write_manifest(
        out,
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dataset": "lfw",
            "split": "test",
            "num_samples": len(samples),
            "num_classes": len(NAMES),
            "classes": NAMES,
            "image_size": list(SIZE),
            "template": scaled_template(SIZE),
            "jpeg_quality": 95,
            "num_rejects": 0,
            "num_inputs": len(samples),
            "shards": [
                {"file": i.file, "index": i.index, "samples": i.samples, "bytes": i.bytes, "sha256": i.sha256}
                for i in infos
            ],
            "pairs": pairs,
            "seed": seed,
            "command": "tests/eval/test_lfw.py",
            "created_by": "tests",
        },
    )
    return out


def make_checkpoint(path: Path, seed: int = 0, backbone: str = "tiny", size: tuple[int, int] = SIZE) -> Path:
    """A random tiny net whose BN statistics are calibrated on face-like images.

    Freshly initialized, the net outputs ~1e-8 in eval mode and every cosine is ~1; calibrated, the
    embeddings are centred and scores spread as they would for a trained net.
    """
    torch.manual_seed(seed)
    model = build_backbone(backbone, 32, size)
    rng = np.random.default_rng(seed)
    faces = np.stack([cv2.resize(_face(rng, i % len(NAMES)), size[::-1]) for i in range(48)])
    x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 127.5 - 1
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for chunk in x.split(16):
            model(chunk)
    spec = {"backbone": backbone, "embedding_size": 32, "image_size": list(size)}
    save_embedding_checkpoint(path, spec, model.state_dict())
    return path


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def make_onnx(path: Path, seed: int = 0, size: tuple[int, int] = SIZE) -> Path:
    """A tiny random ONNX embedding model written with onnx.helper (a torch export takes tens of
    seconds): a 2x2 stride-16 convolution, PReLU, a linear layer to 32-d. Its kernels respond mostly
    to pixel-to-pixel differences, i.e. to each image's noise, so build_lfw_shards' faces score an
    imperfect 0.80 accuracy (figures that can move). Metadata as eval/export_onnx.py writes it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    cells = (size[0] // 16) * (size[1] // 16)
    conv_w = rng.normal(0, 0.05, (1, 3, 2, 2))
    weights = {
        "conv_w": conv_w - 0.9 * conv_w.mean(axis=(2, 3), keepdims=True),  # little of the mean colour
        "conv_b": np.zeros(1),
        "slope": np.full((1, 1, 1), 0.25),
        "fc_w": rng.normal(0, 0.05, (cells, 32)),
        "fc_b": np.zeros(32),
        "shape": np.array([0, -1]),
    }
    nodes = [
        helper.make_node("Conv", ["faces", "conv_w", "conv_b"], ["c"], kernel_shape=[2, 2], strides=[16, 16]),
        helper.make_node("PRelu", ["c", "slope"], ["p"]),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("faces", TensorProto.FLOAT, ["batch", 3, *size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 32])],
        [
            numpy_helper.from_array(v.astype(np.int64 if k == "shape" else np.float32), k)
            for k, v in weights.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime and OpenVINO both read
    helper.set_model_props(
        model, {"backbone": "tiny-onnx", "embedding_size": "32", "image_size": f"{size[0]},{size[1]}"}
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
