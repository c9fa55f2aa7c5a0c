"""Training-batch throughput of a shards/ backend against a naive DataLoader baseline, in one run.

Measured: images/s delivered as model-ready training batches (read + decode + flip augmentation +
normalization, float32 NCHW on the CPU), after the first batch (worker start-up excluded), over
the same number of images for both. Baseline: `torch.utils.data.DataLoader` over the same aligned
faces written out as individual JPEG files in class folders, decoded with PIL, per-sample
`ToTensor`-style conversion and normalization, random flip, default collate; same batch size and
workers. Prints both, the ratio, and one JSON line last.

With `--epochs K` it measures instead what the training loop sees across epoch boundaries: K whole
epochs of the shards (use a small set), timed from the first batch, with the readers kept up across
epochs (today's default: torch workers and the DALI pipeline persist; the DALI source reads in
`--source-workers` processes) against the same loader re-created every epoch with the source
read in the training process (what the trainer did before). It reports images/s over the K epochs
and the mean wait for the first batch of each new epoch.

    python -m bench.loader --shards OUT/train --backend torch [--batch-size 128 --workers 2 --images 4096]
    python -m bench.loader --shards OUT/small --backend dali --epochs 4 [--source-workers 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from common.cli import CliParser, UserError, progress, run_cli
from shards.loader import build_train_loader
from shards.manifest import load_manifest
from shards.sample_index import SampleReader, build_sample_table

console = Console(file=sys.stderr)


class _FolderDataset(torch.utils.data.Dataset):
    """The naive baseline: one JPEG file per sample, PIL decode, per-sample float conversion."""

    def __init__(self, files: list[tuple[str, int]]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        with Image.open(path) as im:
            x = torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1).float().div(255)
        if torch.rand(()) < 0.5:
            x = torch.flip(x, dims=[2])
        return (x - 0.5) / 0.5, label


def _export_folders(manifest, out: Path, limit: int) -> list[tuple[str, int]]:
    """Write the first `limit` samples of the shards as class-folder JPEG files (bytes unchanged)."""
    table = build_sample_table(manifest, want_keys=True)
    reader = SampleReader(table)
    files = []
    for i in range(min(limit, len(table))):
        jpg, label = reader.read(i)
        folder = out / f"{label:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{table.keys[i]}.jpg"  # type: ignore[index]
        path.write_bytes(jpg)
        files.append((str(path), label))
    reader.close()
    return files


def _measure(name: str, batches, batch_size: int, images: int) -> float:
    """Images/s from the end of the first batch until `images` more images have arrived."""
    need = max(1, images // batch_size)
    with progress(f"[bold]{name}", unit="batch") as bar:
        task = bar.add_task(name, total=need)
        it = iter(batches)
        next(it)  # start-up (workers, pipeline build) is not throughput
        start, done, elapsed = time.perf_counter(), 0, 0.0
        for x, _ in it:
            assert x.dtype == torch.float32 and x.shape[1] == 3
            done += 1
            bar.update(task, advance=1)
            if done >= need:
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)  # the last batches' GPU work counts too
                elapsed = time.perf_counter() - start  # before shutting the workers down
                break
        close = getattr(it, "close", None)
        if close:
            close()
    if done < need:
        raise UserError(f"{name}: the shards ran out after {done} timed batches; use fewer --images")
    return done * batch_size / elapsed


def _measure_epochs(loader, epochs: int) -> tuple[float, float]:
    """(images/s over `epochs` whole epochs after the first batch, mean seconds waited for the first
    batch of each later epoch), iterating as the trainer does: set_epoch, then a pass."""
    images, waits, start = 0, [], None
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        asked = time.perf_counter()
        for k, (x, _) in enumerate(loader):
            if start is None:  # start-up (first workers, pipeline build) is not throughput
                start = time.perf_counter()
                continue
            if k == 0:
                waits.append(time.perf_counter() - asked)
            images += x.shape[0]
    elapsed = time.perf_counter() - start
    loader.close()
    return images / elapsed, sum(waits) / max(1, len(waits))


def _epochs_main(args, manifest) -> int:
    common = dict(batch_size=args.batch_size, backend=args.backend, workers=args.workers, device=args.device)
    runs = {}
    for name, kwargs in [
        ("persistent", dict(persistent_workers=True, source_workers=args.source_workers)),
        ("per-epoch", dict(persistent_workers=False, source_workers=0)),
    ]:
        loader = build_train_loader(manifest, **common, **kwargs)
        console.print(f"{name}: {args.epochs} epochs of {loader.batches_per_epoch} batches")
        runs[name] = _measure_epochs(loader, args.epochs)
    (ours, ours_wait), (base, base_wait) = runs["persistent"], runs["per-epoch"]
    print(
        f"{args.backend}, readers kept across epochs: {ours:.0f} images/s, first batch of an epoch "
        f"after {ours_wait * 1000:.0f} ms"
    )
    print(
        f"baseline, loader re-created per epoch, source in-process: {base:.0f} images/s, first batch "
        f"after {base_wait * 1000:.0f} ms"
    )
    print(f"ratio: {ours / base:.2f}x")
    print(
        json.dumps(
            {
                "bench": "loader_epochs",
                "backend": args.backend,
                "device": str(args.device),
                "batch_size": args.batch_size,
                "workers": args.workers,
                "source_workers": args.source_workers,
                "epochs": args.epochs,
                "samples": manifest.num_samples,
                "images_per_s": round(ours, 1),
                "epoch_start_wait_s": round(ours_wait, 4),
                "baseline": "loader re-created every epoch, DALI source in the training process",
                "baseline_images_per_s": round(base, 1),
                "baseline_epoch_start_wait_s": round(base_wait, 4),
                "ratio": round(ours / base, 3),
            }
        )
    )
    return 0


def run(argv: list[str] | None = None) -> int:
    ap = CliParser(
        prog="python -m bench.loader",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--shards", required=True, help="shard folder with manifest.json")
    ap.add_argument("--backend", choices=["dali", "torch"], required=True)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--images", type=int, default=4096, help="images timed per reader (after the first batch)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--epochs",
        type=int,
        default=0,
        help="measure K whole epochs, readers kept up vs re-created (see above)",
    )
    ap.add_argument(
        "--source-workers",
        type=int,
        default=None,
        help="DALI: processes reading for the pipeline's source (default: the loader's)",
    )
    args = ap.parse_args(argv)
    manifest = load_manifest(args.shards)
    torch.set_num_threads(1)  # the readers' workers are the parallelism, in both runs
    if args.epochs:
        if args.epochs < 2:
            raise UserError(f"--epochs {args.epochs}: needs at least 2 (the boundaries are the point)")
        return _epochs_main(args, manifest)
    needed = args.images + 2 * args.batch_size
    if manifest.num_samples < needed:
        raise UserError(
            f"{args.shards}: {manifest.num_samples} samples, the run needs {needed} (lower --images)"
        )
    loader = build_train_loader(
        manifest,
        batch_size=args.batch_size,
        backend=args.backend,
        workers=args.workers,
        device=args.device,
        source_workers=args.source_workers,
    )
    ours = _measure(f"{args.backend}", loader, args.batch_size, args.images)

    with tempfile.TemporaryDirectory(prefix="facetrain-bench-") as tmp:
        files = _export_folders(manifest, Path(tmp), needed)
        baseline_loader = torch.utils.data.DataLoader(
            _FolderDataset(files),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            drop_last=True,
            persistent_workers=False,
        )
        base = _measure("PIL folders", baseline_loader, args.batch_size, args.images)

    ratio = ours / base
    print(f"{args.backend}: {ours:.0f} images/s")
    print(f"baseline (DataLoader, PIL, JPEG files in class folders): {base:.0f} images/s")
    print(f"ratio: {ratio:.2f}x")
    print(
        json.dumps(
            {
                "bench": "loader",
                "backend": loader.backend,
                "device": str(args.device),
                "batch_size": args.batch_size,
                "workers": args.workers,
                "images": args.images,
                "images_per_s": round(ours, 1),
                "baseline": "torch DataLoader + PIL over class-folder JPEGs",
                "baseline_images_per_s": round(base, 1),
                "ratio": round(ratio, 3),
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
