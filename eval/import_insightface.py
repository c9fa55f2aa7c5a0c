"""Import InsightFace arcface_torch's released `backbone.pth` as a facetrain embedding-model file,
which every evaluator, the ONNX export, identification and the trainer (`model.init_from`) read:

    python eval/import_insightface.py --weights backbone.pth --arch r50 --out r50.pt
    python eval/lfw.py --model r50.pt --shards data/shards/lfw
    python trainer/main.py --config my.yaml model.backbone=ir50 model.embedding_size=512 \\
        model.kwargs.fixed_feature_scale=true model.init_from=r50.pt optim.backbone_lr_mult=0.1

--arch is their name: r18 r34 r50 r100 r200 (their IResNet: our ir18 ... ir200 with
fixed_feature_scale, the embedding BatchNorm's scale kept at 1.0 as theirs), mbf (their
MobileFaceNet: our insightface_mbf) or vit_t vit_s vit_b vit_l (their face ViT, any of its drop-path
and mask variants: our vit_t ... vit_l). Their IResNet and MobileFaceNet layers come in our modules'
order, so each of their tensors goes to ours by position; their ViT has our names. Each tensor's
name's last part (weight, running_var, ...) and shape are checked: the weights, the BatchNorm
statistics and the embedding BatchNorm load exactly as saved. Their input is ours: RGB 112x112,
(pixel / 255 - 0.5) / 0.5. The file is read with torch.load(weights_only=True): a pickle that would
run code is refused, never executed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common.cli import CliParser, UserError, run_cli
from eval.import_mobilefacenet import read_source
from models.backbones import build_backbone
from models.model_file import save_embedding_checkpoint

# Their --arch name -> (our backbone, its kwargs, their key holding the embedding size).
IRESNET = {"fixed_feature_scale": True}
ARCHS: dict[str, tuple[str, dict, str]] = {
    "r18": ("ir18", IRESNET, "features.running_mean"),
    "r34": ("ir34", IRESNET, "features.running_mean"),
    "r50": ("ir50", IRESNET, "features.running_mean"),
    "r100": ("ir100", IRESNET, "features.running_mean"),
    "r200": ("ir200", IRESNET, "features.running_mean"),
    "mbf": ("insightface_mbf", {}, "features.layers.3.running_mean"),
    "vit_t": ("vit_t", {}, "feature.3.running_mean"),
    "vit_s": ("vit_s", {}, "feature.3.running_mean"),
    "vit_b": ("vit_b", {}, "feature.3.running_mean"),
    "vit_l": ("vit_l", {}, "feature.3.running_mean"),
}
# Their ViT always has a mask token; ours only when it trains with masking (vit_b, vit_l). Unused in eval.
UNUSED_IN_EVAL = {"mask_token"}
IMAGE_SIZE = (112, 112)  # their IResNet's fc is sized for 7x7 maps, their GDC for 7x7: 112 only


def our_layout(arch: str, embedding_size: int) -> dict[str, torch.Tensor]:
    """Our backbone's state dict for their arch, as shapes only (meta tensors: no memory, instant)."""
    backbone, kwargs, _ = ARCHS[arch]
    with torch.device("meta"):
        return build_backbone(backbone, embedding_size, IMAGE_SIZE, **kwargs).state_dict()


def aligned(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Theirs in our order when the names are ours (the ViTs: their blocks register both norms before
    attention, ours in forward order), else as they are (matched by position)."""
    kept = {k: v for k, v in theirs.items() if k in ours or k not in UNUSED_IN_EVAL}
    return {k: kept[k] for k in ours} if kept.keys() == ours.keys() else theirs


def mismatch(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> str | None:
    """Why their tensors do not fit ours by position, or None when every one does."""
    if len(theirs) != len(ours):
        return f"{len(theirs)} tensors where it has {len(ours)}"
    for (their_name, value), (our_name, like) in zip(theirs.items(), ours.items()):
        if their_name.rsplit(".", 1)[-1] != our_name.rsplit(".", 1)[-1] or value.shape != like.shape:
            return f"{their_name} {tuple(value.shape)} where it has {our_name} {tuple(like.shape)}"
    return None


def embedding_size(theirs: dict[str, torch.Tensor], arch: str) -> int | None:
    value = theirs.get(ARCHS[arch][2])
    return int(value.shape[0]) if value is not None and value.dim() == 1 else None


def fitting_archs(theirs: dict[str, torch.Tensor]) -> list[str]:
    """The --arch values the weights would fit (for the error message of a wrong one)."""
    sizes = {arch: embedding_size(theirs, arch) for arch in ARCHS}
    return [
        arch
        for arch, size in sizes.items()
        if size and mismatch(aligned(theirs, ours := our_layout(arch, size)), ours) is None
    ]


def convert(theirs: dict[str, torch.Tensor], arch: str, where: str) -> tuple[dict[str, torch.Tensor], int]:
    """Our backbone's state dict from theirs, and the embedding size; UserError in one line."""
    size = embedding_size(theirs, arch)
    ours = our_layout(arch, size) if size is not None else {}
    theirs = aligned(theirs, ours)
    problem = mismatch(theirs, ours) if size is not None else f"no {ARCHS[arch][2]}"
    if size is None or problem is not None:
        fits = fitting_archs(theirs)
        hint = f"it fits --arch {' / '.join(fits)}" if fits else "it is none of " + ", ".join(ARCHS)
        raise UserError(f"{where}: not InsightFace's {arch} ({problem}); {hint}")
    state = {name: value.to(like.dtype).clone() for (name, like), value in zip(ours.items(), theirs.values())}
    return state, size


def run(argv: list[str] | None = None) -> int:
    ap = CliParser(
        prog="eval/import_insightface.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--weights", required=True, type=Path, help="their backbone.pth (a state dict)")
    ap.add_argument("--arch", required=True, choices=sorted(ARCHS), help="their network's name")
    ap.add_argument("--out", required=True, type=Path, help="the embedding-model file to write")
    args = ap.parse_args(argv)
    state, size = convert(read_source(args.weights), args.arch, str(args.weights))
    backbone, kwargs, _ = ARCHS[args.arch]
    spec = {"backbone": backbone, "embedding_size": size, "image_size": list(IMAGE_SIZE), "kwargs": kwargs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_embedding_checkpoint(args.out, spec, state, imported_from=f"insightface {args.arch} {args.weights}")
    params = sum(
        v.numel()
        for k, v in state.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    print(json.dumps({"out": str(args.out), "params": params, **spec}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
