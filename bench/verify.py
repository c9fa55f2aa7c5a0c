"""eval/verify.py against a plain onnxruntime loop, on the same pairs, in the same run.

    python -m bench.verify --onnx MODEL.onnx --shards LFW_SHARDS [--repeats 2] [--batch-size 8]

The baseline is what one writes by hand: read the JPEGs of the faces the pairs use out of the tar
shards (tarfile), decode them with OpenCV, run them through an onnxruntime session (its default
threads) 8 faces at a time with their mirror images, add and normalize, score the pairs and run the
same k-fold metrics. eval/verify.py runs with its defaults (`--runtime auto`: OpenVINO on the CPU
when installed; 4 faces a batch, one batch per core, decoding ahead in a thread). Both are timed
end to end (model loading included) and alternate (ABBA with --repeats 2), because these machines
are shared: the load average is printed with each run, then the ratio of the medians. Last line:
one JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from common.cli import CliParser, cpu_count, run_cli
from eval.verification.metrics import pair_scores, verification_metrics
from shards.manifest import load_manifest


def plain_loop(onnx: Path, shards: Path, batch_size: int) -> float:
    """The hand-written evaluation; returns its 10-fold accuracy."""
    import onnxruntime as ort

    manifest = load_manifest(shards)
    pairs = manifest.pairs or []
    wanted = {k for p in pairs for k in (p.a, p.b)}
    jpegs: dict[str, bytes] = {}
    for tar_path in manifest.shard_paths():
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if ext == "jpg" and key in wanted:
                    jpegs[key] = tar.extractfile(m).read()  # type: ignore[union-attr]
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    keys = sorted(jpegs)
    feats = []
    for s in range(0, len(keys), batch_size):
        batch = np.stack(
            [
                cv2.cvtColor(
                    cv2.imdecode(np.frombuffer(jpegs[k], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
                )
                for k in keys[s : s + batch_size]
            ]
        )
        x = (batch.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - 0.5) / 0.5
        out = sess.run(None, {name: np.concatenate([x, x[:, :, :, ::-1]])})[0]
        emb = out[: len(x)] + out[len(x) :]
        feats.append(emb / np.linalg.norm(emb, axis=1, keepdims=True))
    scores, same, folds = pair_scores(np.concatenate(feats), {k: i for i, k in enumerate(keys)}, pairs)
    return verification_metrics(scores, same, folds)["accuracy_mean"]


def ours(onnx: Path, shards: Path, json_path: Path) -> float:
    from eval.verify import main as verify_main

    code = verify_main(["--onnx", str(onnx), "--sets", f"lfw={shards}", "--json", str(json_path), "--quiet"])
    if code != 0:
        raise SystemExit(code)
    return json.loads(json_path.read_text())["sets"]["lfw"]["accuracy_mean"]


def timed(fn, *args) -> tuple[float, float]:  # noqa: ANN001
    start = time.perf_counter()
    acc = fn(*args)
    return time.perf_counter() - start, acc


def run(argv: Sequence[str] | None = None) -> int:
    p = CliParser(prog="python -m bench.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", type=Path, required=True)
    p.add_argument("--shards", type=Path, required=True, help="LFW shards (pairs in the manifest)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each; 2 or more alternate ABBA")
    p.add_argument("--batch-size", type=int, default=8, help="the baseline's batch (default 8)")
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {"verify": [], "plain": []}
    accs: dict[str, float] = {}
    json_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_verify_{os.getpid()}.json"
    order = [("verify", "plain") if r % 2 == 0 else ("plain", "verify") for r in range(args.repeats)]
    for r, pair in enumerate(order):
        for which in pair:
            load = os.getloadavg()[0]
            if which == "verify":
                t, accs[which] = timed(ours, args.onnx, args.shards, json_path)
            else:
                t, accs[which] = timed(plain_loop, args.onnx, args.shards, args.batch_size)
            times[which].append(t)
            print(
                f"run {r + 1} {which:>6}: {t:7.1f} s  accuracy {accs[which]:.4f}  "
                f"(load average before: {load:.1f})",
                flush=True,
            )
    json_path.unlink(missing_ok=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"eval/verify.py {med['verify']:.1f} s, plain onnxruntime loop {med['plain']:.1f} s: "
        f"{med['plain'] / med['verify']:.2f}x faster (median of {args.repeats} run(s) each)",
        flush=True,
    )
    print(
        json.dumps(
            {
                "bench": "verify",
                "pairs": "lfw",
                "verify_s": round(med["verify"], 1),
                "plain_onnxruntime_s": round(med["plain"], 1),
                "speedup": round(med["plain"] / med["verify"], 3),
                "verify_runs_s": [round(t, 1) for t in times["verify"]],
                "plain_runs_s": [round(t, 1) for t in times["plain"]],
                "accuracy_verify": round(accs["verify"], 4),
                "accuracy_plain": round(accs["plain"], 4),
                "cpus": cpu_count(),
            }
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
