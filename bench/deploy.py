"""CPU deployment: onnxruntime fp32 (the baseline), OpenVINO fp32 and OpenVINO INT8 of one model, in
one run: images/s at batch 1 and 32 on real aligned LFW faces, and the LFW accuracy of each.

    python eval/import_mobilefacenet.py --source ../shared/data/reference/mobilefacenet_112x96_casia.ckpt \\
        --image-size 112x96 --out /tmp/mfn.pt
    python preprocess/build_shards.py lfw --root ../shared/data/lfw --out /tmp/lfw-112x96 \\
        --image-size 112x96 --landmarks ../shared/data/lfw/lfw_landmark_150.txt \\
        --pairs ../shared/data/lfw/pairs.txt
    python -m bench.deploy --model /tmp/mfn.pt --shards /tmp/lfw-112x96 [--samples 64] [--rounds 3]

The ONNX file (eval/export_onnx.py's export of a checkpoint, or the file given) is what onnxruntime
runs; the IRs are eval/export_openvino.py's, INT8 calibrated on `--samples` faces of the shards.
Speed: the same faces through each runtime in turn, `--rounds` times interleaved (the machine is
shared: the best round of each counts), all cores. Accuracy: eval/lfw.py's 10-fold protocol with
the mirror image added. Goal (issue 26): INT8 >= 4x onnxruntime at batch 32 with <= 0.3 point LFW
drop. Last line: one JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.cli import CliParser, cpu_count, run_cli
from eval.export_openvino import aligned_faces, convert, model_input, source_onnx, verification_accuracy
from models.load import LoadedModel, load_model

BATCHES = (1, 32)
FACES_PER_BATCH = {1: 64, 32: 512}  # faces per timed pass (batch 1 is the slow one)


def images_per_s(model: LoadedModel, faces: np.ndarray, batch: int) -> float:
    """Faces per second through `model.embed` at `batch`, the first batch (warm-up) not counted."""
    x = model_input(faces[: FACES_PER_BATCH[batch]])
    model.embed(x[:batch])
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        model.embed(x[i : i + batch])
    return len(x) / (time.perf_counter() - start)


def run(argv: Sequence[str] | None = None) -> int:
    p = CliParser(prog="python -m bench.deploy", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="checkpoint (.pt) or ONNX model")
    p.add_argument("--shards", type=Path, required=True, help="LFW shards at the model's face size")
    p.add_argument("--samples", type=int, default=64, help="INT8 calibration faces (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds (default 3)")
    args = p.parse_args(argv)
    faces = aligned_faces(args.shards, max(FACES_PER_BATCH.values()), seed=1)
    with tempfile.TemporaryDirectory(prefix="bench_deploy") as tmp:
        work = Path(tmp)
        onnx_path, meta = source_onnx(args.model, work)
        calibration = aligned_faces(args.shards, args.samples)
        convert(onnx_path, {**meta, "precision": "fp32"}, None, work / "fp32.xml")
        convert(onnx_path, {**meta, "precision": "int8"}, calibration, work / "int8.xml")
        models = {
            "onnxruntime_fp32": load_model(onnx_path, runtime="onnxruntime"),
            "openvino_fp32": load_model(work / "fp32.xml"),
            "openvino_int8": load_model(work / "int8.xml"),
        }
        rates: dict[str, dict[int, float]] = {name: {b: 0.0 for b in BATCHES} for name in models}
        for r in range(args.rounds):
            for name, model in models.items():
                for b in BATCHES:
                    rates[name][b] = max(rates[name][b], images_per_s(model, faces, b))
            print(
                f"round {r + 1}: "
                + "  ".join(f"{n} b{b} {rates[n][b]:.0f}/s" for n in models for b in BATCHES),
                file=sys.stderr,
                flush=True,
            )
        accuracy = {}
        for name, model in models.items():
            accuracy[name] = verification_accuracy(model, args.shards)["accuracy_mean"]
            print(f"{name}: LFW {accuracy[name]:.4f}", file=sys.stderr, flush=True)
    base = rates["onnxruntime_fp32"]
    print(f"{'runtime':<18}{'b1 img/s':>10}{'b32 img/s':>11}{'x ort b1':>10}{'x ort b32':>11}{'LFW':>9}")
    for name in models:
        print(
            f"{name:<18}{rates[name][1]:>10.0f}{rates[name][32]:>11.0f}{rates[name][1] / base[1]:>10.2f}"
            f"{rates[name][32] / base[32]:>11.2f}{100 * accuracy[name]:>9.2f}"
        )
    drop = 100 * (accuracy["onnxruntime_fp32"] - accuracy["openvino_int8"])
    speedup = rates["openvino_int8"][32] / base[32]
    print(
        json.dumps(
            {
                "bench": "deploy",
                "model": str(args.model),
                "cpus": cpu_count(),
                "calibration_faces": args.samples,
                "images_per_s": {n: {f"batch_{b}": round(v, 1) for b, v in rates[n].items()} for n in models},
                "ratio_vs_onnxruntime": {
                    n: {f"batch_{b}": round(rates[n][b] / base[b], 2) for b in BATCHES} for n in models
                },
                "lfw_accuracy": {n: round(a, 5) for n, a in accuracy.items()},
                "int8_lfw_drop_points": round(drop, 3),
                "goal_met": bool(speedup >= 4 and drop <= 0.3),
            }
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
