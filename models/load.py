"""The one model loader: a facetrain checkpoint (.pt), an ONNX file or an OpenVINO IR (.xml) ->
a `LoadedModel`.

Every command that takes a model (eval/lfw.py, eval/verify.py, eval/ijb.py, eval/identify.py,
bench/identify.py; eval/export_onnx.py for checkpoints only) declares it with `add_model_arguments`
(`--model FILE`, with `--checkpoint` and `--onnx` as aliases, and `--runtime`) and loads it with
`model_from_args`. The kind is told by the suffix (.onnx; .xml; .pt/.pth), else by the content (a
torch zip file, a protobuf starting with ONNX's ir_version field, or XML). A checkpoint is read
through models/model_file.py, so its optimizer and head states are never read.

Runtimes: a checkpoint runs under PyTorch, an OpenVINO IR under OpenVINO. An ONNX file runs under
onnxruntime or OpenVINO (`--runtime`); `auto` picks OpenVINO on the CPU when it is installed: on the
2-core CPU the reference MobileFaceNet ran 2.6x (batch 1) and 2.2x (batch 32) faster under it nearly
idle, 2.4-5x with other work on the cores (`python -m bench.deploy`), with the same LFW figures
(tests/eval/test_export_openvino.py). `_openvino_embedder` says how batches use the cores.
OpenVINO runs in float32 (its CPU default on bf16-capable CPUs is bf16, which moves the figures).
The model's metadata (eval/export_onnx.py's ONNX metadata_props, eval/export_openvino.py's rt_info
under "facetrain") gives its face size, embedding size, backbone and threshold; metadata another
tool wrote is read where it can be, else replaced by what the graph says, with a warning
(`_describe` has the rules).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.cli import UserError, cpu_count, log
from models.model_file import INPUT_SPEC, as_threshold, read_model_file

# float32 NCHW batch (normalized as docs/CONTRACTS.md says: "Model input") -> (N, D) float32 embeddings
EmbedFn = Callable[[torch.Tensor], np.ndarray]

_CHECKPOINT_SUFFIXES = (".pt", ".pth")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format
_ONNX_FIRST_BYTE = b"\x08"  # ModelProto field 1 (ir_version, varint): the first thing onnx writes
_XML_MAGIC = b"<?xm"  # an OpenVINO IR's first bytes
RUNTIMES = ("auto", "onnxruntime", "openvino")
RT_INFO_KEY = "facetrain"  # where eval/export_openvino.py puts the metadata in an IR's rt_info


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
    kind: str  # "checkpoint", "onnx" or "openvino"
    embed: EmbedFn
    backbone: str  # the checkpoint's backbone; a model file's metadata, else its kind
    embedding_size: int | None  # None: an ONNX model that does not say
    image_size: tuple[int, int]  # (H, W) of the aligned faces it takes
    threshold: float | None  # the verification threshold a checkpoint's validation stored
    module: nn.Module | None  # the PyTorch network (checkpoints only)
    runtime: str = "torch"  # "torch", "onnxruntime" or "openvino"
    # The input contract's entries (INPUT_SPEC's keys) the file states: all of them for a checkpoint
    # (its format fixes them), those a model file's metadata records (none for a foreign ONNX file)
    input_spec: dict[str, str] = field(default_factory=lambda: dict(INPUT_SPEC))

    @property
    def name(self) -> str:
        """How reports name the model: the path, with the backbone for a checkpoint."""
        return f"{self.path} ({self.backbone})" if self.kind == "checkpoint" else str(self.path)

    @property
    def architecture(self) -> str:
        return f"{self.backbone}/{self.embedding_size or '?'}"

    def fingerprint(self) -> str:
        """sha256 of the weights: the checkpoint's tensors, or the model file's bytes (an IR's .xml
        and .bin)."""
        if self.module is None:
            digest = hashlib.sha256(self.path.read_bytes())
            if self.kind == "openvino":
                digest.update(self.path.with_suffix(".bin").read_bytes())
            return digest.hexdigest()
        digest = hashlib.sha256()
        for name, tensor in self.module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def check_size(self, size: tuple[int, int] | list[int], holder: str) -> None:
        """UserError unless the model takes faces of `size` (what `holder`, e.g. "the shards in X", holds)."""
        if tuple(size) != self.image_size:
            raise UserError(f"{self.path}: model takes {self.image_size} faces, {holder} hold {tuple(size)}")

    def check_input_spec(self, holder: str) -> None:
        """UserError when the file states an input contract other than INPUT_SPEC, which `holder`
        (e.g. "the training data") follows; a file that states none is taken to follow it, as every
        evaluator takes it."""
        differs = [f"{k} {v!r}" for k, v in self.input_spec.items() if v != INPUT_SPEC[k]]
        if differs:
            wanted = ", ".join(f"{k} {INPUT_SPEC[k]!r}" for k in INPUT_SPEC)
            raise UserError(f"{self.path}: model input is {', '.join(differs)}; {holder} is {wanted}")


def model_kind(path: Path) -> str:
    """The file's kind, "checkpoint", "onnx" or "openvino": by suffix, else by its first bytes;
    UserError for none of them."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".xml":
        return "openvino"
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
    if head == _XML_MAGIC:
        return "openvino"
    raise UserError(
        f"{path}: neither a facetrain checkpoint (.pt), an ONNX model (.onnx) nor an OpenVINO model (.xml)"
    )


def load_model(
    path: Path | str,
    device: str | torch.device = "cpu",
    *,
    image_size: tuple[int, int] | None = None,
    onnx_threads: int | None = None,
    runtime: str = "auto",
) -> LoadedModel:
    """The model in `path` on `device`. image_size: the face size to assume for an ONNX model that
    records none; onnx_threads: onnxruntime or OpenVINO threads (default: one per core); runtime:
    what runs an ONNX file (RUNTIMES; see the module's docstring)."""
    path = Path(path)
    device = resolve_device(device) if isinstance(device, str) else device
    kind = model_kind(path)
    if kind != "checkpoint":
        if pick_runtime(kind, runtime, device) == "openvino":
            return _load_openvino(path, kind, device, image_size, onnx_threads)
        return _load_onnx(path, device, image_size, onnx_threads)
    model_file = read_model_file(path)
    module = model_file.build(device)
    spec = model_file.spec
    return LoadedModel(
        path,
        "checkpoint",
        torch_embedder(module, device),
        str(spec["backbone"]),
        int(spec["embedding_size"]),
        tuple(int(v) for v in spec["image_size"]),  # type: ignore[arg-type]
        model_file.threshold,
        module,
    )


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def pick_runtime(kind: str, runtime: str, device: torch.device) -> str:
    """ "onnxruntime" or "openvino" for a model file of `kind` ("onnx" or "openvino"); UserError
    for a runtime that cannot run it here."""
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime: expected one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if kind == "openvino" and runtime == "onnxruntime":
        raise UserError("--runtime onnxruntime: an OpenVINO model (.xml) runs under OpenVINO only")
    if runtime == "auto":
        runtime = (
            "openvino"
            if kind == "openvino" or (device.type == "cpu" and openvino_installed())
            else "onnxruntime"
        )
    if runtime == "openvino":
        if device.type != "cpu":
            raise UserError(f"--device {device.type}: OpenVINO models run on the CPU here (use --device cpu)")
        if not openvino_installed():
            raise UserError("OpenVINO is not installed (pip install -r requirements/cpu.txt)")
    return runtime


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


def _load_onnx(
    path: Path, device: torch.device, image_size: tuple[int, int] | None, threads: int | None
) -> LoadedModel:
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
        raise UserError(
            f"{path}: expected one NCHW image input, model has {[(i.name, i.shape) for i in inputs]}"
        )
    shape = inputs[0].shape
    meta = sess.get_modelmeta().custom_metadata_map
    if inputs[0].type != "tensor(float)":
        raise UserError(
            f"{path}: input {inputs[0].name} is {inputs[0].type}, the commands feed tensor(float)"
        )
    outputs = sess.get_outputs()
    info = _describe(path, "onnx", meta, shape, outputs[0].shape if outputs else [], image_size)
    name = inputs[0].name

    def run(images: torch.Tensor) -> np.ndarray:
        return np.asarray(sess.run(None, {name: images.numpy().astype(np.float32, copy=False)})[0])

    return LoadedModel(path, "onnx", run, *info, None, "onnxruntime", _recorded_input_spec(meta))


def _load_openvino(
    path: Path, kind: str, device: torch.device, image_size: tuple[int, int] | None, threads: int | None
) -> LoadedModel:
    """An OpenVINO model (an IR, or an ONNX file through OpenVINO's ONNX reader) compiled for the
    CPU in float32; UserError naming the file."""
    import openvino as ov

    if not path.is_file():
        raise UserError(f"{path}: model file not found")
    if kind == "openvino" and not path.with_suffix(".bin").is_file():
        raise UserError(f"{path}: its weights file {path.with_suffix('.bin').name} is missing")
    core = ov.Core()
    try:
        network = core.read_model(str(path))
    except Exception as err:  # OpenVINO raises RuntimeError with pages of text for bad files
        raise UserError(
            f"{path}: not a loadable {'OpenVINO' if kind == 'openvino' else 'ONNX'} model "
            f"({type(err).__name__})"
        ) from None
    inputs = network.inputs
    shape = list(inputs[0].get_partial_shape()) if len(inputs) == 1 else []
    if len(shape) != 4:
        raise UserError(
            f"{path}: expected one NCHW image input, model has {[str(i.get_partial_shape()) for i in inputs]}"
        )
    dims = [d.get_length() if d.is_static else None for d in shape]
    outputs = network.outputs
    out_dims = (
        [d.get_length() if d.is_static else None for d in outputs[0].get_partial_shape()] if outputs else []
    )
    meta = _rt_info_metadata(network) if kind == "openvino" else onnx_metadata(path)
    info = _describe(path, kind, meta, dims, out_dims, image_size)
    run = _openvino_embedder(core, network, path, threads)
    return LoadedModel(path, kind, run, *info, None, "openvino", _recorded_input_spec(meta))


OPENVINO_CHUNK = 8  # images per inference when a batch is cut into chunks, one chunk per stream


def _openvino_embedder(core: object, network: object, path: Path, threads: int | None) -> EmbedFn:
    """Run batches on the CPU in float32; UserError naming the file when OpenVINO cannot compile the
    model.

    `threads` given (callers run batches at once from several threads, or leave cores to other
    work): a stream of `threads` threads per that many cores, each call one inference on one stream.
    Not given, the model has every core: a batch of up to OPENVINO_CHUNK images is one inference
    over all cores (for 1 face 1.6-1.7x one core's speed at load 3 on the 2-core CPU), a larger
    one is cut into chunks of that size that run at once, one per core on single-threaded streams
    (AsyncInferQueue; a second compilation, made on first use). Batches of 32 so ran 1.02-1.05x
    (nearly idle) to 1.1-1.2x (busy) faster under INT8 MobileFaceNet, and 1.1-1.5x under float32,
    than as one inference over both cores, whose threads wait for each other after every layer
    (docs/benchmarks.md, "CPU deployment")."""
    import openvino as ov

    def compiled(hint: dict[str, object]) -> object:
        try:
            with _signal_stack_kept():
                return core.compile_model(network, "CPU", {"INFERENCE_PRECISION_HINT": "f32", **hint})  # type: ignore[attr-defined]
        except Exception as err:
            raise UserError(f"{path}: OpenVINO cannot compile the model ({type(err).__name__})") from None

    def streams_of(count: int, per_stream: int) -> dict[str, object]:
        return {
            "PERFORMANCE_HINT": "THROUGHPUT",
            "NUM_STREAMS": count,
            "INFERENCE_NUM_THREADS": count * per_stream,
        }

    if threads is not None:  # chunk_streams: the single-threaded streams a large batch's chunks share
        whole, chunk_streams = compiled(streams_of(max(1, cpu_count() // threads), threads)), 1
    else:
        whole, chunk_streams = compiled({"PERFORMANCE_HINT": "LATENCY"}), cpu_count()
    chunked: list[object] = []  # the per-core compilation, once made
    lock = threading.Lock()
    local = threading.local()  # a request serves one call at a time: each calling thread has its own

    def keep(request: object, where: tuple[dict[int, np.ndarray], int]) -> None:
        parts, start = where
        parts[start] = np.array(request.get_output_tensor(0).data, dtype=np.float32)  # type: ignore[attr-defined]

    def in_chunks(batch: np.ndarray) -> np.ndarray:
        if not hasattr(local, "queue"):
            with lock:
                if not chunked:
                    chunked.append(compiled(streams_of(chunk_streams, 1)))
            local.queue = ov.AsyncInferQueue(chunked[0], chunk_streams)
            local.queue.set_callback(keep)
        parts: dict[int, np.ndarray] = {}
        for start in range(0, len(batch), OPENVINO_CHUNK):
            local.queue.start_async(
                {0: batch[start : start + OPENVINO_CHUNK]}, (parts, start), share_inputs=True
            )
        local.queue.wait_all()
        return np.concatenate([parts[start] for start in sorted(parts)])

    def run(images: torch.Tensor) -> np.ndarray:
        batch = np.ascontiguousarray(images.numpy(), dtype=np.float32)
        if len(batch) > OPENVINO_CHUNK and chunk_streams > 1:
            return in_chunks(batch)
        if not hasattr(local, "request"):
            local.request = whole.create_infer_request()  # type: ignore[attr-defined]
        return np.array(local.request.infer({0: batch}, share_inputs=True)[0], dtype=np.float32)

    return run


@contextlib.contextmanager
def _signal_stack_kept() -> Iterator[None]:
    """Give the calling thread back its alternate signal stack after OpenVINO's compile_model.

    compile_model (2026.4, CPU) points the thread's sigaltstack at memory of its own and puts back, when
    the model goes, the stack it found, which may be another model's, freed by then. The next signal
    delivered on that stack (Python's handlers and faulthandler's use it; torch's DataLoader adds one
    for SIGCHLD) kills the process with SIGSEGV: a test run died so in `subprocess.run` after an
    OpenVINO test. With ours restored, every model finds and puts back the same valid stack."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    before = _StackT()
    libc.sigaltstack(None, ctypes.byref(before))
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(before), None)


class _StackT(ctypes.Structure):
    """Linux's stack_t (sigaltstack's argument)."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _recorded_input_spec(meta: Mapping[str, str]) -> dict[str, str]:
    """The entries of the input contract (INPUT_SPEC's keys) that a model file's metadata records."""
    return {k: str(meta[k]) for k in INPUT_SPEC if k in meta}


def _rt_info_metadata(network: object) -> dict[str, str]:
    """The "facetrain" entries of an IR's rt_info as strings (empty when it has none)."""
    if not network.has_rt_info([RT_INFO_KEY]):  # type: ignore[attr-defined]
        return {}
    section = network.get_rt_info([RT_INFO_KEY]).astype(dict)  # type: ignore[attr-defined]
    return {str(k): v.astype(str) for k, v in section.items()}


def onnx_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's metadata_props (what onnxruntime's custom_metadata_map gives)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # DecodeError and friends
        raise UserError(f"{path}: not a loadable ONNX model ({type(err).__name__})") from None
    return {p.key: p.value for p in proto.metadata_props}


def _describe(
    path: Path,
    kind: str,
    meta: Mapping[str, str],
    input_shape: Sequence[object],
    output_shape: Sequence[object],
    image_size: tuple[int, int] | None,
) -> tuple[str, int | None, tuple[int, int], float | None]:
    """(backbone, embedding size, face size, threshold) of a model file from its metadata, its input
    shape (NCHW; None or a name for a dynamic dimension) and its output shape (N, D).

    Metadata written by another tool is read where it can be: a face size as "H,W", "HxW" or "N";
    a key that is absent or that does not read as ours (a size "112 by 112", an embedding size
    "512d", a threshold outside [-1, 1]) is taken from the graph instead (the input's fixed H and W,
    the output's width; no threshold), with a warning naming the file and key. A face size that
    neither gives is `image_size`, else a UserError; so is metadata that says the model takes
    other input than the commands feed (layout, colour order, mean and std)."""
    if input_shape[1] not in (3, None) and not isinstance(input_shape[1], str):
        raise UserError(f"{path}: input has {input_shape[1]} channels, the shards hold RGB (3)")
    if output_shape and len(output_shape) != 2:  # no shape: a graph that does not say
        raise UserError(f"{path}: expected an (N, D) embedding output, the model's is {list(output_shape)}")
    _check_input_spec(path, meta)
    hw = input_shape[2:]
    fixed = tuple(hw) if all(isinstance(v, int) and v > 0 for v in hw) else None
    recorded = meta.get("image_size")
    size = _recorded_size(recorded)
    if recorded is not None and size is None:
        if fixed is None and image_size is None:
            raise UserError(
                f"{path}: metadata image_size {recorded!r} is not 'H,W' and the model's input shape "
                f"does not fix the face size"
            )
        _not_ours(path, "image_size", recorded, "the input shape's" if fixed else "the given")
    size = size or fixed or image_size
    if size is None:
        raise UserError(f"{path}: the model records no input size (export it with eval/export_onnx.py)")
    size = (int(size[0]), int(size[1]))
    if fixed is not None and fixed != size:
        raise UserError(
            f"{path}: model input is {fixed[0]}x{fixed[1]}, its metadata says {size[0]}x{size[1]}"
        )
    width = output_shape[-1] if output_shape else None
    out_dim = width if isinstance(width, int) and width > 0 else None
    text = meta.get("embedding_size")
    embedding = int(text) if text is not None and text.strip().isdigit() and int(text) > 0 else None
    if text is not None and embedding is None:
        _not_ours(path, "embedding_size", text, "the output's")
    if embedding is not None and out_dim is not None and embedding != out_dim:
        raise UserError(f"{path}: metadata embedding_size {embedding}, the model outputs {out_dim} numbers")
    text = meta.get("threshold")
    try:
        threshold = as_threshold(float(text)) if text is not None else None
    except ValueError:
        threshold = None
    if text is not None and threshold is None:
        _not_ours(path, "threshold", text, "no")
    return meta.get("backbone", kind), embedding or out_dim, size, threshold


def _recorded_size(text: str | None) -> tuple[int, int] | None:
    """The (H, W) of a metadata image_size ("H,W", "HxW", "N", "[H, W]"), None when absent or unreadable."""
    if text is None:
        return None
    parts = re.split(r"\s*[,xX]\s*", text.strip().strip("[]() "))
    try:
        h, w = (int(p) for p in (parts * 2 if len(parts) == 1 else parts))
    except ValueError:  # not numbers, or not two of them
        return None
    return (h, w) if h > 0 and w > 0 else None


def _not_ours(path: Path, key: str, value: str, instead: str) -> None:
    """The warning for a metadata value another tool wrote, and what is used instead."""
    log(f"warning: {path}: metadata {key} {value!r} is not in facetrain's form; {instead} {key} is used")


def _check_input_spec(path: Path, meta: Mapping[str, str]) -> None:
    """UserError when the metadata says the model takes other input than the commands feed every
    model (docs/CONTRACTS.md "Model input": NCHW, RGB, (pixel / 255 - 0.5) / 0.5)."""
    for key in ("layout", "color"):
        value = meta.get(key)
        if value is not None and value.strip().upper() != INPUT_SPEC[key]:
            raise UserError(f"{path}: metadata {key} {value!r}: the commands feed {INPUT_SPEC[key]} faces")
    for key in ("mean", "std"):
        value = meta.get(key)
        if value is None:
            continue
        numbers = [float(v) for v in re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", value)]
        # 0.5 on pixels scaled to [0, 1], or 127.5 on 0..255: the same normalization
        if not numbers or not any(all(abs(v - ours) < 1e-3 * ours for v in numbers) for ours in (0.5, 127.5)):
            raise UserError(
                f"{path}: metadata {key} {value!r}: the commands feed (pixel / 255 - 0.5) / 0.5 "
                f"(mean and std 0.5, or 127.5 on 0..255)"
            )


# ------------------------------------------------------------------ the one --model argument


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    onnx: bool = True,
    required: bool = True,
    help_prefix: str = "",
    runtime: bool = True,
) -> None:
    """`--model FILE` (dest "model"), with `--checkpoint` (and, unless onnx=False, `--onnx`) as
    aliases; with onnx and runtime, `--runtime` (what runs an ONNX file)."""
    group = parser.add_mutually_exclusive_group(required=required)
    what = (
        "a facetrain checkpoint (.pt), an ONNX model (.onnx) or an OpenVINO model (.xml)"
        if onnx
        else "a facetrain checkpoint (.pt)"
    )
    group.add_argument("--model", type=Path, metavar="FILE", help=f"{help_prefix}{what}")
    group.add_argument("--checkpoint", type=Path, dest="model", metavar="FILE", help="same as --model")
    if onnx:
        group.add_argument("--onnx", type=Path, dest="model", metavar="FILE", help="same as --model")
    if onnx and runtime:
        parser.add_argument(
            "--runtime",
            choices=RUNTIMES,
            default="auto",
            help="what runs an ONNX model: auto (OpenVINO on the CPU when installed, "
            "else onnxruntime), onnxruntime or openvino",
        )


def model_from_args(
    args: argparse.Namespace, *, image_size: tuple[int, int] | None = None, onnx_threads: int | None = None
) -> LoadedModel:
    """The model of `add_model_arguments`, on `args.device` (cpu when the command has no --device),
    under `args.runtime` (auto when the command has no --runtime)."""
    return load_model(
        args.model,
        getattr(args, "device", "cpu"),
        image_size=image_size,
        onnx_threads=onnx_threads,
        runtime=getattr(args, "runtime", "auto"),
    )
