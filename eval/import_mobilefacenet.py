"""Import a MobileFaceNet trained elsewhere as a facetrain checkpoint, so eval/lfw.py (and ONNX
export) can measure it on our shards:

    python eval/import_mobilefacenet.py --source 068.ckpt --image-size 112x96 --out mobilefacenet.pt
    python eval/lfw.py --checkpoint mobilefacenet.pt --shards data/shards/lfw-112x96

The source is the widely used PyTorch MobileFaceNet layout (`conv1`, `dw_conv1`, `blocks.N.conv.*`,
`conv2`, `linear7`, `linear1`; plain state dict or `{"net_state_dict": ...}`), which has the same
layers in the same order as models/backbones/mobilefacenet.py; each tensor is matched by position
and its shape checked. Such models take `(pixel - 127.5) / 128`; ours take `(pixel - 127.5) / 127.5`,
so the first convolution's weights are scaled by 127.5 / 128 (exact: that convolution has no bias
and pads with zeros). Shards must be built at the model's input size (`--image-size` of
build_shards.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common.cli import CliParser, UserError, run_cli
from models.backbones import build_backbone
from models.model_file import save_embedding_checkpoint
from shards.format import parse_image_size

THEIR_INPUT_SCALE = 128.0  # (pixel - 127.5) / 128
OUR_INPUT_SCALE = 127.5  # (pixel - 127.5) / 127.5


def read_source(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path}: not a loadable PyTorch weights file ({type(err).__name__})") from None
    state = obj.get("net_state_dict", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
    tensors = isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())
    if not tensors:
        raise UserError(f"{path}: no state dict of tensors inside (expected the tensors or net_state_dict)")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel saves add "module."


def convert(source: dict[str, torch.Tensor], image_size: tuple[int, int], where: str) -> tuple[dict, int]:
    """Our backbone's state dict from the source's, and the embedding size."""
    if "linear1.conv.weight" not in source or "conv1.conv.weight" not in source:
        raise UserError(f"{where}: not the MobileFaceNet layout (conv1 ... linear1 keys missing)")
    embedding = source["linear1.conv.weight"].shape[0]
    target = build_backbone("mobilefacenet", embedding, image_size).state_dict()
    if len(target) != len(source):
        raise UserError(f"{where}: {len(source)} tensors, our MobileFaceNet has {len(target)}")
    out = {}
    for (ours, like), (theirs, value) in zip(target.items(), source.items()):
        if value.numel() != like.numel() or value.dim() < like.dim():
            raise UserError(
                f"{where}: {theirs} {tuple(value.shape)} does not fit {ours} {tuple(like.shape)} "
                f"(a different --image-size, or another architecture)"
            )
        out[ours] = value.reshape(like.shape).to(like.dtype).clone()
    first = next(iter(out))
    out[first] *= OUR_INPUT_SCALE / THEIR_INPUT_SCALE
    return out, embedding


def run(argv: list[str] | None = None) -> int:
    ap = CliParser(
        prog="eval/import_mobilefacenet.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--source", required=True, type=Path, help="the MobileFaceNet weights to import")
    ap.add_argument("--out", required=True, type=Path, help="facetrain checkpoint to write")
    ap.add_argument(
        "--image-size",
        type=parse_image_size,
        default=(112, 112),
        help="the model's input, N or HxW (default 112)",
    )
    args = ap.parse_args(argv)
    state, embedding = convert(read_source(args.source), args.image_size, str(args.source))
    spec = {"backbone": "mobilefacenet", "embedding_size": embedding, "image_size": list(args.image_size)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_embedding_checkpoint(args.out, spec, state, imported_from=str(args.source))
    print(json.dumps({"out": str(args.out), **spec}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
