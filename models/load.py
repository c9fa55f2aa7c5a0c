"""The one model loader: a facetrain checkpoint (.pt) or an ONNX file -> a `LoadedModel`.

Every command that takes a model (eval/lfw.py, eval/verify.py, eval/ijb.py, eval/identify.py,
bench/identify.py; eval/export_onnx.py for checkpoints only) declares it with `add_model_arguments`
(`--model FILE`, with `--checkpoint` and `--onnx` as aliases) and loads it with `model_from_args`.
The kind is told by the suffix (.onnx; .pt/.pth), else by the content (a torch zip file, or a
protobuf starting with ONNX's ir_version field). A checkpoint is read through
models/model_file.py, so its optimizer and head states are never read.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.cli import UserError
from models.model_file import read_model_file

# float32 NCHW batch (normalized as docs/CONTRACTS.md says: "Model input") -> (N, D) float32 embeddings
EmbedFn = Callable[[torch.Tensor], np.ndarray]

_CHECKPOINT_SUFFIXES = (".pt", ".pth")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format
_ONNX_FIRST_BYTE = b"\x08"  # ModelProto field 1 (ir_version, varint): the first thing onnx writes


def resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device: expected cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use --device cpu)")
    return torch.device(name)


@dataclass
class LoadedModel:
    """An embedding model ready to run, with what reports and galleries record about it."""

    path: Path
    kind: str                      # "checkpoint" or "onnx"
    embed: EmbedFn
    backbone: str                  # the checkpoint's backbone; an ONNX file's metadata, else "onnx"
    embedding_size: int | None     # None: an ONNX model that does not say
    image_size: tuple[int, int]    # (H, W) of the aligned faces it takes
    threshold: float | None        # the verification threshold a checkpoint's validation stored
    module: nn.Module | None       # the PyTorch network (checkpoints only)

    @property
    def name(self) -> str:
        """How reports name the model: the path, with the backbone for a checkpoint."""
        return f"{self.path} ({self.backbone})" if self.kind == "checkpoint" else str(self.path)

    @property
    def architecture(self) -> str:
        return f"{self.backbone}/{self.embedding_size or '?'}"

    def fingerprint(self) -> str:
        """sha256 of the weights: the checkpoint's tensors, or the ONNX file's bytes."""
        if self.module is None:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        digest = hashlib.sha256()
        for name, tensor in self.module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def check_size(self, size: tuple[int, int] | list[int], holder: str) -> None:
        """UserError unless the model takes faces of `size` (what `holder`, e.g. "the shards in X", holds)."""
        if tuple(size) != self.image_size:
            raise UserError(f"{self.path}: model takes {self.image_size} faces, {holder} hold {tuple(size)}")


def model_kind(path: Path) -> str:
    """The file's kind, "checkpoint" or "onnx": by suffix, else by its first bytes; UserError for neither."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in _CHECKPOINT_SUFFIXES:
        return "checkpoint"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise UserError(f"{path}: model file not found") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the model file ({err.strerror})") from None
    if head == _ZIP_MAGIC:
        return "checkpoint"
    if head[:1] == _ONNX_FIRST_BYTE:
        return "onnx"
    raise UserError(f"{path}: neither a facetrain checkpoint (.pt) nor an ONNX model (.onnx)")


def load_model(path: Path | str, device: str | torch.device = "cpu", *,
               image_size: tuple[int, int] | None = None, onnx_threads: int | None = None) -> LoadedModel:
    """The model in `path` on `device`. image_size: the face size to assume for an ONNX model that
    records none; onnx_threads: onnxruntime intra-op threads (default: one per core)."""
    path = Path(path)
    device = resolve_device(device) if isinstance(device, str) else device
    if model_kind(path) == "onnx":
        return _load_onnx(path, device, image_size, onnx_threads)
    model_file = read_model_file(path)
    module = model_file.build(device)
    spec = model_file.spec
    return LoadedModel(path, "checkpoint", torch_embedder(module, device), str(spec["backbone"]),
                       int(spec["embedding_size"]), tuple(int(v) for v in spec["image_size"]),  # type: ignore[arg-type]
                       model_file.threshold, module)


def torch_embedder(model: nn.Module, device: torch.device) -> EmbedFn:
    """An embedder for a model of its own: moved to `device`, channels-last (1.3-1.5x faster
    depthwise/1x1 convolutions on the CPU (MobileFaceNet) and on GPUs), eval mode."""
    model = model.to(device, memory_format=torch.channels_last).eval()
    return module_embedder(model, channels_last=True)


def module_embedder(model: nn.Module, channels_last: bool = False) -> EmbedFn:
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


def _load_onnx(path: Path, device: torch.device, image_size: tuple[int, int] | None,
               threads: int | None) -> LoadedModel:
    """An onnxruntime session with the face size and architecture its metadata (eval/export_onnx.py)
    or its input shape records; UserError naming the file."""
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
    meta = sess.get_modelmeta().custom_metadata_map
    fixed = tuple(shape[2:]) if all(isinstance(v, int) and v > 0 for v in shape[2:]) else None
    size = _recorded_size(path, meta.get("image_size")) or fixed or image_size
    if size is None:
        raise UserError(f"{path}: the model records no input size (export it with eval/export_onnx.py)")
    size = (int(size[0]), int(size[1]))
    if fixed is not None and fixed != size:
        raise UserError(f"{path}: model input is {fixed[0]}x{fixed[1]}, its metadata says "
                        f"{size[0]}x{size[1]}")
    out_dim = sess.get_outputs()[0].shape[-1] if sess.get_outputs() else None
    recorded = meta.get("embedding_size", "")
    embedding = int(recorded) if recorded.isdigit() else out_dim if isinstance(out_dim, int) else None
    name = inputs[0].name

    def run(images: torch.Tensor) -> np.ndarray:
        return np.asarray(sess.run(None, {name: images.numpy().astype(np.float32, copy=False)})[0])

    return LoadedModel(path, "onnx", run, meta.get("backbone", "onnx"), embedding or None, size, None, None)


def _recorded_size(path: Path, text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{path}: metadata image_size {text!r} is not 'H,W'") from None
    return h, w


# ------------------------------------------------------------------ the one --model argument


def add_model_arguments(parser: argparse.ArgumentParser, *, onnx: bool = True, required: bool = True,
                        help_prefix: str = "") -> None:
    """`--model FILE` (dest "model"), with `--checkpoint` (and, unless onnx=False, `--onnx`) as aliases."""
    group = parser.add_mutually_exclusive_group(required=required)
    what = "a facetrain checkpoint (.pt) or an ONNX model (.onnx)" if onnx else "a facetrain checkpoint (.pt)"
    group.add_argument("--model", type=Path, metavar="FILE", help=f"{help_prefix}{what}")
    group.add_argument("--checkpoint", type=Path, dest="model", metavar="FILE", help="same as --model")
    if onnx:
        group.add_argument("--onnx", type=Path, dest="model", metavar="FILE", help="same as --model")


def model_from_args(args: argparse.Namespace, *, image_size: tuple[int, int] | None = None,
                    onnx_threads: int | None = None) -> LoadedModel:
    """The model of `add_model_arguments`, on `args.device` (cpu when the command has no --device)."""
    return load_model(args.model, getattr(args, "device", "cpu"), image_size=image_size,
                      onnx_threads=onnx_threads)
