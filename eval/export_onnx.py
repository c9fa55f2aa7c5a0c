"""Export a checkpoint's embedding network to ONNX (dynamic batch) and check it with onnxruntime.

    python eval/export_onnx.py --checkpoint CKPT --out MODEL.onnx     (--model CKPT: the same)

The model's input spec (image size, layout, colour order, normalization) goes into the ONNX
metadata. The export is run with onnxruntime on random inputs of two batch sizes against PyTorch;
the max abs difference is printed and above --tolerance (1e-4) the command fails. The file is
written under a temporary name and replaces --out only once it has the asked opset and passed that
check: a failed export never costs an existing good model.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.cli import CliParser, UserError, run_cli
from common.fileio import atomic_write, checked_replace
from models.load import add_model_arguments
from models.model_file import INPUT_SPEC, load_embedding_model

MIN_OPSET = 7  # the oldest opset torch.onnx knows; onnx.defs gives the newest
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="eval/export_onnx.py", description=__doc__.split("\n\n")[0])
    add_model_arguments(p, onnx=False)
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed (1e-4)")
    p.add_argument("--check-batches", default="1,7", help="batch sizes run through both (default 1,7)")
    return p


def export(model: torch.nn.Module, spec: dict[str, Any], out: Path, opset: int = 18) -> None:
    """torch.onnx.export (dynamo) with a dynamic batch dimension, then the metadata, atomically."""
    import onnx

    h, w = (int(v) for v in spec["image_size"])
    example = torch.zeros(2, 3, h, w)
    batch = torch.export.Dim("batch", min=1)
    chatter = io.StringIO()
    with warnings.catch_warnings(), redirect_stdout(chatter), redirect_stderr(chatter):  # exporter notes
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    proto = program.model_proto
    meta = {
        **INPUT_SPEC,
        "image_size": f"{h},{w}",
        "mean": "0.5,0.5,0.5",
        "std": "0.5,0.5,0.5",
        "embedding_size": str(spec["embedding_size"]),
        "backbone": str(spec["backbone"]),
        "backbone_kwargs": json.dumps(spec.get("kwargs", {})),
        "producer": "facetrain eval/export_onnx.py",
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, str(v)
    with atomic_write(out, "wb", what="ONNX file") as f:
        onnx.save(proto, f)


def max_abs_diff(
    model: torch.nn.Module,
    onnx_path: Path,
    image_size: tuple[int, int],
    batches: Sequence[int],
    seed: int = 0,
) -> tuple[float, float]:
    """(largest |PyTorch - onnxruntime|, largest |PyTorch output|) over random inputs in [-1, 1]."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except RuntimeError as err:  # onnxruntime's Fail / InvalidGraph / NotImplemented (an opset it lacks)
        first = (str(err).strip().splitlines() or ["no reason given"])[0]
        raise UserError(f"{onnx_path}: onnxruntime cannot load the export ({first})") from None
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    scale = 0.0
    for b in batches:
        x = torch.rand(b, 3, *image_size, generator=gen) * 2 - 1
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {INPUT_NAME: x.numpy()})[0]
        if got.shape != ref.shape:
            raise UserError(f"{onnx_path}: ONNX output {got.shape} for batch {b}, PyTorch gives {ref.shape}")
        worst = max(worst, float(np.max(np.abs(got - ref))))
        scale = max(scale, float(np.max(np.abs(ref))))
    return worst, scale


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        batches = [int(v) for v in args.check_batches.split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"--check-batches: expected comma-separated integers, got {args.check_batches!r}"
        ) from None
    if not batches or min(batches) < 1:
        raise UserError(f"--check-batches: batch sizes must be positive, got {args.check_batches!r}")
    newest = onnx_newest_opset()
    if not MIN_OPSET <= args.opset <= newest:
        raise UserError(f"--opset {args.opset}: the exporter writes opsets {MIN_OPSET} to {newest}")
    model, spec = load_embedding_model(args.model)
    image_size = (int(spec["image_size"][0]), int(spec["image_size"][1]))
    print(
        f"exporting {spec['backbone']} ({spec['embedding_size']}-d, {image_size[0]}x{image_size[1]}) "
        f"from {args.model}",
        file=sys.stderr,
    )
    with checked_replace(args.out) as tmp:
        export(model, spec, tmp, args.opset)
        written = file_opset(tmp)
        if written != args.opset:  # the exporter falls back to its own opset when it cannot convert
            raise UserError(
                f"--opset {args.opset}: this model cannot be exported at that opset (the exporter "
                f"made opset {written}); {args.out} not written"
            )
        diff, scale = max_abs_diff(model, tmp, image_size, batches)
        # The output scale says how much the absolute figure means (an untrained net can output ~1e-8).
        print(
            json.dumps(
                {
                    "onnx": str(args.out),
                    "max_abs_diff": diff,
                    "max_abs_output": scale,
                    "batches": batches,
                    "tolerance": args.tolerance,
                }
            )
        )
        if not diff <= args.tolerance:  # also catches NaN
            raise UserError(
                f"{args.out}: onnxruntime differs from PyTorch by {diff:.3g} "
                f"(> {args.tolerance:g}); the export is not faithful, not written"
            )
    return 0


def onnx_newest_opset() -> int:
    import onnx.defs

    return int(onnx.defs.onnx_opset_version())


def file_opset(path: Path) -> int | None:
    """The default-domain opset an ONNX file declares."""
    import onnx

    imports = onnx.load(str(path), load_external_data=False).opset_import
    return next((int(i.version) for i in imports if i.domain in ("", "ai.onnx")), None)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
