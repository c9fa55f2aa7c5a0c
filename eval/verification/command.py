"""What the verification commands (eval/verify.py, eval/lfw.py) share: the run options, the model
(models/load.py's `--model`) as an embedding function, and the run over prepared sets."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common.cli import UserError, cpu_count
from eval.verification.metrics import NonFiniteEmbeddings
from eval.verification.sets import PreparedSet, SetResult, evaluate_set
from models.load import EmbedFn, model_from_args
from shards.manifest import Manifest


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """How the pairs are read and how the model runs: the options both commands take."""
    p.add_argument("--folds", type=int, help="split one-fold pairs (View 1, plain lists) into K folds")
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave out pairs naming an image the shards lack (reported), instead of failing",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="faces per forward (x2 with flip); default 4 on cpu, 256 on cuda",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="ONNX on cpu: batches run at once, one thread each (default: the cores)",
    )
    p.add_argument("--no-flip", action="store_true", help="no flip test-time augmentation")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def resolve_batch_size(args: argparse.Namespace) -> int:
    # On the CPU small batches are fastest (measured on 2 cores, docs/benchmarks.md "verification"):
    # forwards of 4-8 images ran ~20% more images per CPU-second than 32-128 under OpenVINO, ~10%
    # under onnxruntime, ~1.8x under PyTorch (a few images' activations stay in the core's cache,
    # presumably). A GPU wants large ones.
    size = args.batch_size if args.batch_size is not None else (256 if args.device == "cuda" else 4)
    if size < 1:
        raise UserError(f"--batch-size must be at least 1, got {size}")
    return size


def set_embedder(args: argparse.Namespace, manifest: Manifest) -> tuple[EmbedFn, str, int]:
    """(model, its name, batches to run at once) for faces of the manifest's size: ONNX on the CPU
    runs one single-threaded batch per core, which on 2 busy cores is faster than one session
    spreading each small batch over both."""
    parallel = args.parallel if args.parallel is not None else cpu_count()
    if parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {parallel}")
    # ONNX and OpenVINO models run several batches at once; checkpoints run one at a time
    several = args.device == "cpu" and parallel > 1
    model = model_from_args(args, image_size=tuple(manifest.image_size), onnx_threads=1 if several else None)
    model.check_size(manifest.image_size, f"the shards in {manifest.root}")
    return model.embed, model.name, parallel if several and model.kind in ("onnx", "openvino") else 1


def evaluate_sets(
    embed: EmbedFn,
    model_name: str,
    prepared: Sequence[PreparedSet],
    *,
    batch_size: int,
    flip: bool,
    parallel: int,
    show_progress: bool,
) -> list[SetResult]:
    """Every set scored in turn; skipped pairs reported on stderr; a diverged model is one line."""
    results = []
    for ps in prepared:
        if ps.pairs.skipped:
            print(
                f"{ps.name}: skipped {ps.pairs.skipped} pairs naming images not in {ps.manifest.root}",
                file=sys.stderr,
            )
        try:
            results.append(
                evaluate_set(
                    embed,
                    ps,
                    batch_size=batch_size,
                    flip=flip,
                    parallel=parallel,
                    show_progress=show_progress,
                )
            )
        except NonFiniteEmbeddings as err:
            raise UserError(
                f"{model_name.split()[0]}: {err}; the model's weights are not usable "
                "(a diverged training run?)"
            ) from None
    return results
