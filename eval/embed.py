"""A PyTorch checkpoint or an ONNX model as an embedding function, and the one flip rule.

Flip test-time augmentation (`flip_embed`, the one flip rule; eval/verification/embed_keys.py and
eval/ijb.py use it): each batch goes through the model together with its mirror image (one forward
of 2B), the two embeddings are added and the sum L2-normalized.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.cli import UserError

# float32 NCHW batch (normalized as DESIGN.md says) -> (N, D) float32 embeddings
EmbedFn = Callable[[torch.Tensor], np.ndarray]

# The input every embedding model takes (DESIGN.md); export_onnx.py records it in the ONNX metadata.
INPUT_SPEC = {"layout": "NCHW", "color": "RGB", "dtype": "float32",
              "normalization": "(pixel / 255 - 0.5) / 0.5"}


def resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device: expected cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use --device cpu)")
    return torch.device(name)


def model_embedder(checkpoint: Path | None, onnx: Path | None, device_name: str,
                   onnx_size: tuple[int, int]) -> tuple[EmbedFn, str, tuple[int, int]]:
    """A checkpoint or an ONNX model as an embedding function, its name for reports, and the face
    size it takes: a checkpoint's own, `onnx_size` for an ONNX model. Callers check the size."""
    device = resolve_device(device_name)
    if onnx is not None:
        return onnx_embedder(onnx, onnx_size, device), str(onnx), tuple(onnx_size)  # type: ignore[return-value]
    from trainer.checkpoint import load_embedding_model  # torch model stack only when asked for

    model, spec = load_embedding_model(checkpoint, map_location=device)
    size = tuple(int(v) for v in spec.get("image_size", ()))
    return torch_embedder(model, device), f"{checkpoint} ({spec['backbone']})", size  # type: ignore[return-value]


def torch_embedder(model: torch.nn.Module, device: torch.device) -> EmbedFn:
    """An embedder for a model of its own: moved to `device`, channels-last (1.3-1.5x faster
    depthwise/1x1 convolutions on the CPU (MobileFaceNet) and on GPUs), eval mode."""
    model = model.to(device, memory_format=torch.channels_last).eval()
    return module_embedder(model, channels_last=True)


def module_embedder(model: torch.nn.Module, channels_last: bool = False) -> EmbedFn:
    """An embedder for a model used elsewhere too (the trainer's): runs on the model's device and
    never changes the model (call it in eval mode)."""
    device = next(model.parameters()).device

    @torch.inference_mode()
    def run(images: torch.Tensor) -> np.ndarray:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return model(images).float().cpu().numpy()

    return run


def onnx_embedder(path: Path, image_size: tuple[int, int], device: torch.device,
                  threads: int | None = None) -> EmbedFn:
    """An onnxruntime session checked against the shards' image size; UserError naming the file.

    threads: intra-op threads (default: onnxruntime's, one per core); eval/verify.py runs one
    single-threaded batch per core at once, faster on a small busy CPU.
    """
    import onnxruntime as ort

    if not path.is_file():
        raise UserError(f"{path}: ONNX model file not found")
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    try:
        sess = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types for bad files
        raise UserError(f"{path}: not a loadable ONNX model ({type(err).__name__})") from None
    inputs = sess.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise UserError(f"{path}: expected one NCHW image input, model has "
                        f"{[(i.name, i.shape) for i in inputs]}")
    shape = inputs[0].shape
    if shape[1] not in (3, None) and not isinstance(shape[1], str):
        raise UserError(f"{path}: input has {shape[1]} channels, the shards hold RGB (3)")
    hw = tuple(shape[2:])
    if all(isinstance(v, int) for v in hw) and hw != tuple(image_size):
        raise UserError(f"{path}: model input is {hw[0]}x{hw[1]}, the shards hold "
                        f"{image_size[0]}x{image_size[1]} faces")
    name = inputs[0].name

    def run(images: torch.Tensor) -> np.ndarray:
        return np.asarray(sess.run(None, {name: images.numpy().astype(np.float32, copy=False)})[0])

    return run


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
