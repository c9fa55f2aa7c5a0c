"""Convert MTCNNv2's published landmark net (`det4.caffemodel`) into the state dict that
preprocess/detect.py loads (`preprocess/weights/lnet.pt`). Run once by whoever updates that file;
the detector never needs the caffemodel.

    python preprocess/convert_lnet.py --caffemodel det4.caffemodel --out preprocess/weights/lnet.pt

The source is `code/codes/MTCNNv2/model/det4.caffemodel` of the GitHub repository
kpzhang93/MTCNN_face_detection_alignment (MIT, Kaipeng Zhang). Caffe is not needed: the file is read
as protocol-buffer wire format (a NetParameter's layers, each with its name and its blobs). MTCNN ran
Caffe from MATLAB, so the networks saw every image transposed (x down, y across): each convolution
kernel is transposed back, and the dense layer's input columns are reordered from Caffe's
(channel, x, y) flattening to ours (channel, y, x). The outputs keep their meaning: per point, x
then y, as fractions of its patch.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch

from common.cli import CliParser, UserError, run_cli
from preprocess.detect import _LNet


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of one protocol-buffer message, in order."""
    out, i = [], 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i : i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = data[i : i + size], i + size
        else:
            raise UserError(f"not a caffemodel: unsupported protocol-buffer wire type {wire}")
        out.append((number, wire, value))
    return out


def _blob(data: bytes) -> np.ndarray:
    """BlobProto: shape (field 7, BlobShape.dim = field 1, packed) and float data (field 5, packed)."""
    values: list[np.ndarray] = []
    shape: list[int] = []
    for number, _, value in _fields(data):
        if number == 5:
            values.append(np.frombuffer(value, "<f4"))
        elif number == 7:
            for dim_number, wire, dims in _fields(value):
                if dim_number == 1 and wire == 2:
                    i = 0
                    while i < len(dims):
                        dim, i = _varint(dims, i)
                        shape.append(dim)
                elif dim_number == 1:
                    shape.append(dims)
    array = np.concatenate(values) if values else np.zeros(0, np.float32)
    return array.reshape(shape or array.shape)


def read_caffemodel(path: Path) -> dict[str, list[np.ndarray]]:
    """{layer name: its blobs} of a Caffe model (NetParameter.layer = field 100, LayerParameter.name =
    field 1, .blobs = field 7), layers without weights left out."""
    layers = {}
    for number, wire, value in _fields(path.read_bytes()):
        if number == 100 and wire == 2:
            name, blobs = "", []
            for field, _, item in _fields(value):
                if field == 1:
                    name = item.decode()
                elif field == 7:
                    blobs.append(_blob(item))
            if blobs:
                layers[name] = blobs
    return layers


def convert(layers: dict[str, list[np.ndarray]]) -> dict[str, torch.Tensor]:
    """The _LNet state dict from det4's layers (conv{1,2,3}_k, prelu{1,2,3}_k, fc4, prelu4, fc4_k,
    prelu4_k, fc5_k for the points k = 1..5)."""

    def get(name: str, index: int = 0) -> np.ndarray:
        if name not in layers:
            raise UserError(f"not MTCNNv2's det4: layer {name} missing")
        return layers[name][index]

    state: dict[str, np.ndarray] = {}
    for k in range(5):
        for stage, (conv, prelu) in enumerate(((0, 1), (3, 4), (6, 7)), start=1):
            state[f"branches.{k}.{conv}.weight"] = get(f"conv{stage}_{k + 1}").transpose(0, 1, 3, 2)
            state[f"branches.{k}.{conv}.bias"] = get(f"conv{stage}_{k + 1}", 1)
            state[f"branches.{k}.{prelu}.weight"] = get(f"prelu{stage}_{k + 1}")
        state[f"heads.{k}.0.weight"] = get(f"fc4_{k + 1}")
        state[f"heads.{k}.0.bias"] = get(f"fc4_{k + 1}", 1)
        state[f"heads.{k}.1.weight"] = get(f"prelu4_{k + 1}")
        state[f"heads.{k}.2.weight"] = get(f"fc5_{k + 1}")
        state[f"heads.{k}.2.bias"] = get(f"fc5_{k + 1}", 1)
    dense = get("fc4")
    columns = dense.reshape(len(dense), 5 * 64, 3, 3).transpose(0, 1, 3, 2)  # (c, x, y) -> (c, y, x)
    state["dense4.weight"] = columns.reshape(len(dense), -1)
    state["dense4.bias"] = get("fc4", 1)
    state["prelu4.weight"] = get("prelu4")
    tensors = {name: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for name, v in state.items()}
    _LNet().load_state_dict(tensors)  # every name and shape must match
    return tensors


def run(argv: list[str] | None = None) -> int:
    parser = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caffemodel", type=Path, required=True, help="MTCNNv2's det4.caffemodel")
    parser.add_argument("--out", type=Path, required=True, help="the state dict to write (lnet.pt)")
    args = parser.parse_args(argv)
    if not args.caffemodel.is_file():
        raise UserError(f"{args.caffemodel}: not found")
    state = convert(read_caffemodel(args.caffemodel))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    digest = hashlib.sha256(args.caffemodel.read_bytes()).hexdigest()
    print(f"{args.out}: {len(state)} tensors from {args.caffemodel} (sha256 {digest})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
