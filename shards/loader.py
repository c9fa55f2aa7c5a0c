"""Readers for training and evaluation (the interface of docs/CONTRACTS.md, "Readers").

Training (`build_train_loader`): each rank reads its own slice of one global per-epoch
permutation (details and the padding rule in shards/sample_index.py):

- every rank yields `batches_per_epoch = ceil(N / (world_size * batch_size))` full batches, so
  DDP never waits on a rank that ran out;
- over an epoch every sample is seen exactly once across ranks, except that the last global batch
  is padded with the first `batches_per_epoch * world_size * batch_size - N` samples of the
  epoch's permutation (seen twice);
- the permutation is seeded by (seed, epoch): a different order every epoch, the same on every
  rank and in every run with that seed;
- `set_epoch(epoch, start_batch)` then iterating yields batches start_batch .. end of that same
  order: a run resumed at batch k of an epoch sees exactly the samples the uninterrupted run would
  have seen from k on, with the same augmentation: both backends draw each batch's random choices
  from (seed, epoch, rank, batch) alone (shards/augment.py's `draw_augment`; DALI gets them as
  operator arguments), so a resumed epoch repeats the uninterrupted one with either backend.

Backends: "dali" (DALI pipeline, nvJPEG on a GPU, CPU operators otherwise), "torch" (OpenCV in
DataLoader workers), "auto" (DALI when it is installed and can run on the device, else torch).
Both prefetch: DALI with its queue depth, torch with workers' prefetch_factor and a thread that
moves the next batches to the device while the step runs. With persistent_workers (the default)
the readers stay up across epochs: each epoch's pass reuses the torch workers, or the DALI pipeline
and its source workers; without it every epoch starts them again (a data wait of ~0.4-0.6 s at each
epoch boundary on 2 cores, against 0.05-0.2 s kept up: bench/loader.py --epochs). `close()` stops
them; a pass must end (or its iterator be closed) before the next begins.

Every sample both backends and `iter_eval_batches` read is checked as it is read (its tar header,
the CRC32s in its record, its label's range: `SampleReader.read` in shards/sample_index.py); a
damaged sample stops the reader with one UserError line naming the shard and the sample.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from common.cli import UserError
from shards.augment import AugmentConfig
from shards.manifest import Manifest
from shards.sample_index import RankPlan, SampleReader, Task, build_sample_table
from shards.torch_pipeline import (
    BatchDecoder,
    BatchWorkers,
    DevicePrefetcher,
    iter_uint8_batches,
    to_model_input,
)

BACKENDS = ("auto", "dali", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend "auto" stands for on this machine; UserError for a name or choice that cannot work."""
    from shards.dali_pipeline import dali_importable, dali_sees_gpu

    if backend not in BACKENDS:
        raise UserError(f"loader.backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if backend == "dali":
        if not dali_importable():
            raise UserError(
                "loader.backend=dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130, "
                "or use loader.backend=torch)"
            )
        if device.type == "cuda" and not dali_sees_gpu():
            raise UserError(f"loader.backend=dali: DALI cannot see the GPU of device {device}")
        return "dali"
    # DALI when it can run on this device: on 2 CPU cores its CPU pipeline also delivered ~1.4x the
    # torch backend's batches/s (bench/loader.py)
    if not dali_importable():
        return "torch"
    return "dali" if device.type == "cpu" or dali_sees_gpu() else "torch"


class TrainLoader:
    """Per-rank training batches; see the module docs for the split, padding and resume rules."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        backend: str,
        device: torch.device,
        workers: int,
        augment: AugmentConfig | None,
        channels_last: bool,
        prefetch: int,
        persistent_workers: bool = True,
        source_workers: int | None = None,
    ):
        self.manifest = manifest
        self.table = build_sample_table(manifest)
        self.image_size = tuple(manifest.image_size)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.backend, self.device = backend, device
        self.workers, self.prefetch, self.channels_last = workers, prefetch, channels_last
        self.augment = augment
        self.plan = RankPlan(len(self.table), batch_size, rank, world_size, seed)
        self.batches_per_epoch = self.plan.batches_per_epoch
        self.persistent_workers, self.source_workers = persistent_workers, source_workers
        self.epoch, self.start_batch = 0, 0
        self._torch: BatchWorkers | None = None
        self._dali = None  # shards.dali_pipeline.DaliBatches, built at the first DALI pass

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields batches start_batch .. batches_per_epoch - 1 of this epoch."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def tasks(self) -> list[Task]:
        """(seed words, sample indices) of each remaining batch of the current epoch on this rank."""
        return self.plan.tasks(self.epoch, self.start_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass: the rest of the current epoch. With persistent_workers the readers (torch
        workers, the DALI pipeline and its source workers) stay up for the next epoch's pass."""
        if self.backend == "dali":
            return self._dali_pass()
        if self._torch is None:
            decoder = BatchDecoder(self.table, self.image_size, self.augment)  # type: ignore[arg-type]
            self._torch = BatchWorkers(
                decoder,
                workers=min(self.workers, self.batches_per_epoch),
                prefetch=self.prefetch,
                pin_memory=self.device.type == "cuda",
                persistent=self.persistent_workers,
            )
        source = self._torch.run(self.tasks())
        return iter(DevicePrefetcher(source, self.device, self.channels_last, depth=self.prefetch))

    def _dali_pass(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from shards.dali_pipeline import DaliBatches

        reusable = (
            self.persistent_workers
            and self._dali is not None
            and self._dali.continues(self.epoch, self.start_batch)
        )
        if self._dali is not None and not reusable:
            self._dali.close()
            self._dali = None
        if self._dali is None:
            self._dali = DaliBatches(
                self.table,
                self.plan,
                first_epoch=self.epoch,
                start_batch=self.start_batch,
                image_size=self.image_size,
                augment=self.augment,
                device=self.device,
                channels_last=self.channels_last,
                threads=max(1, self.workers),
                source_workers=self._source_workers(),
                prefetch=self.prefetch,
            )
        return self._dali.epoch()

    def _source_workers(self) -> int:
        """DALI source processes. The default, loader.workers on a GPU: there nvJPEG decodes, and
        reading + checking + drawing the augmentation is the CPU work left, which in the training
        process would compete with the step for the GIL. 0 on the CPU: the decode threads are the
        work, and on 2 cores two source processes beside them cost ~13% of the images/s (LFW
        shards, bench/loader.py --epochs 3)."""
        if self.source_workers is not None:
            return self.source_workers
        return self.workers if self.device.type == "cuda" else 0

    def close(self) -> None:
        """Stops the readers' workers (otherwise they end with this object or the process)."""
        if self._torch is not None:
            self._torch.close()
            self._torch.decoder.reader.close()
            self._torch = None
        if self._dali is not None:
            self._dali.close()
            self._dali = None


def build_train_loader(
    manifest: Manifest,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    workers: int = 2,
    augment: AugmentConfig | None = None,
    channels_last: bool = False,
    prefetch: int = 2,
    persistent_workers: bool = True,
    source_workers: int | None = None,
) -> TrainLoader:
    """The training reader for one rank (see the module docs). persistent_workers: keep the readers
    up across epochs. source_workers (DALI): processes reading the shards for the pipeline's Python
    source; None = `workers` on a GPU and 0 (this process) on the CPU (TrainLoader._source_workers)."""
    if batch_size < 1:
        raise UserError(f"loader.batch_size={batch_size}: must be at least 1")
    if workers < 0:
        raise UserError(f"loader.workers={workers}: must be 0 or more")
    if prefetch < 1:
        raise UserError(f"loader.prefetch={prefetch}: must be at least 1")
    if source_workers is not None and source_workers < 0:
        raise UserError(f"loader.source_workers={source_workers}: must be 0 or more")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    device = torch.device(device)
    augment = (augment or AugmentConfig()).validate()
    chosen = resolve_backend(backend, device)
    return TrainLoader(
        manifest,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        backend=chosen,
        device=device,
        workers=workers,
        augment=augment,
        channels_last=channels_last,
        prefetch=prefetch,
        persistent_workers=persistent_workers,
        source_workers=source_workers,
    )


def iter_eval_batches(
    manifest: Manifest, batch_size: int = 256, workers: int = 0
) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """(keys, images float32 [b, 3, H, W] normalized, labels int64) CPU batches: every sample once, in
    shard order, no augmentation, the last batch partial."""
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: must be at least 1")
    table = build_sample_table(manifest, want_keys=True)
    keys = table.keys or []
    n = len(table)
    tasks = [((0,), np.arange(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    decoder = BatchDecoder(table, tuple(manifest.image_size), None)  # type: ignore[arg-type]
    try:
        batches = iter_uint8_batches(decoder, tasks, workers=min(workers, len(tasks)), prefetch=2)
        for (_, indices), (images, labels) in zip(tasks, batches, strict=True):
            yield [keys[i] for i in indices], to_model_input(images, torch.device("cpu"), False), labels
    finally:
        decoder.reader.close()


__all__ = [
    "AugmentConfig",
    "TrainLoader",
    "build_train_loader",
    "iter_eval_batches",
    "resolve_backend",
    "SampleReader",
]
