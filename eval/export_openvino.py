"""Export an embedding model to OpenVINO IR, float32 or INT8, and check what the export costs.

    python eval/export_openvino.py --model CKPT|M.onnx --out M.xml [--check-sets lfw=SHARDS ...]
    python eval/export_openvino.py --model CKPT|M.onnx --out M.xml --int8 --calibration SHARDS
        [--samples 128] [--check-sets lfw=SHARDS ...] [--max-drop 0.5] [--force]

A checkpoint goes through eval/export_onnx.py's export first. INT8 is NNCF's post-training
quantization, calibrated on `--samples` aligned faces of the `--calibration` shards. The model's
metadata (face size, normalization, embedding size, backbone, threshold) goes into the IR's rt_info
under "facetrain", where models/load.py reads it. The IR is written under a temporary name and
checked before it takes the `--out` name: its embeddings against the original's (cosine, on
calibration faces or random inputs), and with `--check-sets` the 10-fold verification accuracy of
both on each set (shards with pairs, as eval/lfw.py reads them). An export whose accuracy drops by
more than `--max-drop` points on a set, or a float32 export whose embeddings differ (cosine below
0.9999), is not written unless `--force`. One JSON line on stdout says it all.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.cli import CliParser, UserError, run_cli
from eval.export_onnx import export as export_onnx
from eval.verification.sets import evaluate_set, prepare_set
from eval.verification.shard_faces import read_jpeg, shard_jpegs
from models.load import RT_INFO_KEY, LoadedModel, add_model_arguments, load_model, model_kind, onnx_metadata
from models.model_file import read_model_file
from shards.manifest import load_manifest
from shards.torch_pipeline import decode_into, to_model_input

FP32_MIN_COSINE = 0.9999  # a float32 IR computes the same function; below this the export is broken


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(
        prog="eval/export_openvino.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p, runtime=False)
    p.add_argument("--out", type=Path, required=True, help="OpenVINO IR to write (.xml, with its .bin)")
    p.add_argument("--int8", action="store_true", help="quantize to INT8 (needs --calibration)")
    p.add_argument("--calibration", type=Path, help="shard folder whose aligned faces calibrate INT8")
    p.add_argument("--samples", type=int, default=128, help="calibration faces (default 128)")
    p.add_argument(
        "--check-sets",
        nargs="+",
        default=[],
        metavar="NAME=SHARDS",
        help="verification sets (shards with pairs) to measure both models on",
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=0.5,
        help="largest accuracy drop in points allowed on a check set (default 0.5)",
    )
    p.add_argument("--force", action="store_true", help="write the model even if a check fails")
    p.add_argument("--batch-size", type=int, default=32, help="faces per forward in the checks")
    p.add_argument("--seed", type=int, default=0, help="which calibration faces are drawn")
    return p


# ------------------------------------------------------------------ aligned faces and their figures


def aligned_faces(shards: Path, count: int, seed: int = 0) -> np.ndarray:
    """`count` aligned faces (uint8 [N, H, W, 3] RGB) drawn at random from a shard folder (all
    of them when it holds fewer)."""
    manifest = load_manifest(shards)
    members = shard_jpegs(manifest)
    keys = sorted(members)
    keys = random.Random(seed).sample(keys, min(count, len(keys)))
    h, w = manifest.image_size
    faces = np.empty((len(keys), h, w, 3), np.uint8)
    for face, key in zip(faces, keys):
        decode_into(face, read_jpeg(members[key]), f"{manifest.root}: {key}")
    return faces


def model_input(faces: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> the float32 NCHW batch every model takes."""
    return to_model_input(torch.from_numpy(faces), torch.device("cpu"), channels_last=False)


def verification_accuracy(model: LoadedModel, shards: Path, batch_size: int = 32) -> dict:
    """The k-fold verification metrics of `model` on a shard folder's pairs, by eval/verify.py's one
    path (only the faces the pairs use, each with its mirror image)."""
    manifest = load_manifest(shards)
    model.check_size(manifest.image_size, f"the shards in {manifest.root}")
    prepared = prepare_set(manifest.root.name, manifest)
    return evaluate_set(model.embed, prepared, batch_size=batch_size, show_progress=False).metrics


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine between matching rows of two embedding matrices."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


# ------------------------------------------------------------------ the export


def source_onnx(model_path: Path, workdir: Path) -> tuple[Path, dict[str, str]]:
    """An ONNX file of the model (the input itself, or a checkpoint exported into `workdir`) and the
    metadata for the IR: the ONNX metadata plus the checkpoint's threshold."""
    if model_kind(model_path) == "onnx":
        return model_path, onnx_metadata(model_path)
    model_file = read_model_file(model_path)
    onnx_path = workdir / "model.onnx"
    export_onnx(model_file.build(), model_file.spec, onnx_path)
    meta = onnx_metadata(onnx_path)
    if model_file.threshold is not None:
        meta["threshold"] = f"{model_file.threshold:.6f}"
    return onnx_path, meta


def convert(onnx_path: Path, meta: dict[str, str], calibration: np.ndarray | None, out: Path) -> None:
    """Write the IR `out` (.xml + .bin), float32 weights, quantized when `calibration` is given."""
    import openvino as ov

    # convert_model, not Core.read_model: read_model leaves each grouped convolution's weight reshape
    # and each bias broadcast as ShapeOf subgraphs, which NNCF quantizes around and the CPU plugin
    # then cannot run in INT8: MobileFaceNet's 17 depthwise convolutions stayed float32, with a
    # Reorder to u8 after each (1.6x slower at batch 32; python -m bench.deploy)
    network = ov.convert_model(str(onnx_path))
    if calibration is not None:
        network = quantize(network, calibration)
    for key, value in meta.items():
        network.set_rt_info(str(value), [RT_INFO_KEY, key])
    ov.save_model(network, str(out), compress_to_fp16=False)  # fp16 weights would move the figures


def quantize(network: object, faces: np.ndarray) -> object:
    """NNCF post-training INT8 quantization calibrated on the faces, one per item."""
    import logging

    import nncf

    logging.getLogger("nncf").setLevel(logging.ERROR)  # progress chatter
    items = [model_input(faces[i : i + 1]).numpy() for i in range(len(faces))]
    return nncf.quantize(
        network, nncf.Dataset(items), subset_size=len(items), preset=nncf.QuantizationPreset.PERFORMANCE
    )


def temporary_ir(out: Path) -> Path:
    """The name the IR is written and checked under before it replaces `out`."""
    return out.with_name(f".{out.stem}.tmp{os.getpid()}.xml")


def move_ir(src: Path, dst: Path) -> None:
    """Rename an IR's two files; the .xml last, so `dst` names a complete model the moment it exists
    anew."""
    os.replace(src.with_suffix(".bin"), dst.with_suffix(".bin"))
    os.replace(src, dst)


def remove_ir(path: Path) -> None:
    for file in (path, path.with_suffix(".bin")):
        file.unlink(missing_ok=True)


def parse_check_sets(values: Sequence[str]) -> dict[str, Path]:
    sets: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--check-sets: expected NAME=SHARDS, got {value!r}")
        if not (Path(folder) / "manifest.json").is_file():
            raise UserError(f"--check-sets {name}: {folder} holds no manifest.json (not a shard folder)")
        sets[name] = Path(folder)
    return sets


def check_args(args: argparse.Namespace) -> None:
    if model_kind(args.model) == "openvino":
        raise UserError(f"{args.model}: already an OpenVINO model (give the checkpoint or the ONNX file)")
    if args.out.suffix != ".xml":
        raise UserError(f"--out {args.out}: an OpenVINO model file ends in .xml")
    if args.int8 and args.calibration is None:
        raise UserError("--int8 needs --calibration SHARDS (aligned faces to calibrate on)")
    if args.samples < 1 or args.batch_size < 1:
        raise UserError("--samples and --batch-size must be at least 1")
    if not args.out.parent.is_dir():
        raise UserError(f"--out {args.out}: folder {args.out.parent} does not exist")


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    sets = parse_check_sets(args.check_sets)
    start = time.perf_counter()
    original = load_model(args.model, runtime="onnxruntime")
    faces = aligned_faces(args.calibration, args.samples, args.seed) if args.calibration else None
    if faces is not None:
        original.check_size(faces.shape[1:3], f"the shards in {args.calibration}")
    precision = "int8" if args.int8 else "fp32"
    print(
        f"exporting {original.name} ({original.architecture}) to {precision} OpenVINO {args.out}",
        file=sys.stderr,
    )
    tmp = temporary_ir(args.out)
    try:
        with tempfile.TemporaryDirectory(prefix="export_openvino") as workdir:
            onnx_path, meta = source_onnx(args.model, Path(workdir))
            meta.update(precision=precision, producer="facetrain eval/export_openvino.py")
            convert(onnx_path, meta, faces if args.int8 else None, tmp)
        report, failures = check(args, original, load_model(tmp, runtime="openvino"), faces, sets)
        report.update(
            out=str(args.out),
            precision=precision,
            source=str(args.model),
            seconds=round(time.perf_counter() - start, 1),
        )
        written = not failures or args.force
        report["written"] = written
        print(json.dumps(report))
        if not written:
            raise UserError(f"{args.out}: not written: {'; '.join(failures)} (--force writes it anyway)")
        move_ir(tmp, args.out)
    finally:
        remove_ir(tmp)
    return 0


def check(
    args: argparse.Namespace,
    original: LoadedModel,
    exported: LoadedModel,
    faces: np.ndarray | None,
    sets: dict[str, Path],
) -> tuple[dict, list[str]]:
    """The report of the export's checks and the failed ones, each as one phrase."""
    if faces is not None:
        probe = model_input(faces[:64])
    else:  # no faces at hand: random inputs in [-1, 1] (a float32 export must match on anything)
        probe = torch.rand(8, 3, *original.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cosine = min_cosine(original.embed(probe), exported.embed(probe))
    report: dict = {"min_cosine": round(cosine, 6), "sets": {}}
    failures = []
    if not args.int8 and not cosine >= FP32_MIN_COSINE:
        failures.append(f"embeddings differ from the original's (cosine {cosine:.6f} < {FP32_MIN_COSINE})")
    for name, shards in sets.items():
        before = verification_accuracy(original, shards, args.batch_size)["accuracy_mean"]
        after = verification_accuracy(exported, shards, args.batch_size)["accuracy_mean"]
        drop = round(100 * (before - after), 3)
        report["sets"][name] = {
            "original": round(before, 5),
            "exported": round(after, 5),
            "drop_points": drop,
        }
        print(f"{name}: accuracy {before:.4f} -> {after:.4f} (drop {drop:.2f} points)", file=sys.stderr)
        if not drop <= args.max_drop:
            failures.append(f"{name} accuracy drops {drop:.2f} points (> --max-drop {args.max_drop:g})")
    return report, failures


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
