"""Training-batch throughput of a shards/ backend against a naive DataLoader baseline, in one run.

Measured: images/s delivered as model-ready training batches (read + decode + flip augmentation +
normalization, float32 NCHW on the CPU), after the first batch (worker start-up excluded), over
the same number of images for both. Baseline: `torch.utils.data.DataLoader` over the same aligned
faces written out as individual JPEG files in class folders, decoded with PIL, per-sample
`ToTensor`-style conversion and normalization, random flip, default collate; same batch size and
workers. Prints both, the ratio, and one JSON line last.

    python bench/loader.py --shards OUT/train --backend torch [--batch-size 128 --workers 2 --images 4096]
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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from shards.errors import CliParser, UserError, run_cli
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
    with Progress(
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>7} img/s"),
        console=console,
    ) as bar:
        task = bar.add_task(name, total=need, rate="-")
        it = iter(batches)
        next(it)  # start-up (workers, pipeline build) is not throughput
        start, done, elapsed = time.perf_counter(), 0, 0.0
        for x, _ in it:
            assert x.dtype == torch.float32 and x.shape[1] == 3
            done += 1
            rate = done * batch_size / (time.perf_counter() - start)
            bar.update(task, advance=1, rate=f"{rate:.0f}")
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


def main(argv: list[str] | None = None) -> int:
    ap = CliParser(
        prog="bench/loader.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shards", required=True, help="shard folder with manifest.json")
    ap.add_argument("--backend", choices=["dali", "torch"], required=True)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--images", type=int, default=4096, help="images timed per reader (after the first batch)"
    )
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    manifest = load_manifest(args.shards)
    needed = args.images + 2 * args.batch_size
    if manifest.num_samples < needed:
        raise UserError(
            f"{args.shards}: {manifest.num_samples} samples, the run needs {needed} (lower --images)"
        )
    torch.set_num_threads(1)  # the readers' workers are the parallelism, in both runs

    loader = build_train_loader(
        manifest, batch_size=args.batch_size, backend=args.backend, workers=args.workers, device=args.device
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


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
