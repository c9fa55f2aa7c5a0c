"""The pure PyTorch reader: OpenCV decode and augmentation in DataLoader workers, one whole batch
per worker task, then a background thread that moves batches to the device and normalizes them.

Why a batch per task: on 2 cores the per-sample overhead of a DataLoader (a pickle and a queue
message per image, then `default_collate`) costs as much as the decode itself; one task per batch
writes straight into a preallocated uint8 [B, H, W, 3] array and sends one message. uint8 goes
over the worker queue and to the GPU (4x less than float32); the float conversion and
normalization run on the device.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import torch

from common.cli import UserError
from shards.augment import AugmentConfig, augment_image
from shards.lifeline import OWNER_ENV, end_with_parent
from shards.sample_index import SampleReader, SampleTable, Task

# OpenCV >= 4.10 decodes straight to RGB; older builds (as on some GPU images) decode BGR.
_DECODE_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def decode_into(out: np.ndarray, jpg: bytes, where: str) -> None:
    """Decode one JPEG as RGB into `out` (H, W, 3 uint8); UserError naming `where` if it cannot."""
    buf = np.frombuffer(jpg, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR if _DECODE_RGB is None else _DECODE_RGB)
    if img is None:
        raise UserError(f"{where}: corrupt JPEG (cannot decode)")
    if _DECODE_RGB is None:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.shape != out.shape:
        raise UserError(
            f"{where}: image is {img.shape[1]}x{img.shape[0]}, the manifest says "
            f"{out.shape[1]}x{out.shape[0]}"
        )
    out[...] = img


class BatchDecoder(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: a Task in, (uint8 images, int64 labels) out.

    A user error inside a worker comes back as a string (DataLoader would wrap the exception in a
    multi-line message with the worker's traceback) and is raised again by `BatchWorkers.run`.
    """

    def __init__(self, table: SampleTable, image_size: tuple[int, int], augment: AugmentConfig | None):
        self.reader = SampleReader(table)
        self.image_size = image_size
        self.augment = augment

    def __getitem__(self, task: Task):  # type: ignore[override]
        seed_words, indices = task
        h, w = self.image_size
        images = np.empty((len(indices), h, w, 3), dtype=np.uint8)
        labels = np.empty(len(indices), dtype=np.int64)
        rng = np.random.default_rng(list(seed_words)) if self.augment else None
        try:
            for k, i in enumerate(indices):
                jpg, labels[k] = self.reader.read(int(i))
                where = f"{self.reader.table.shard_paths[self.reader.table.shard[i]]} (sample {int(i)})"
                decode_into(images[k], jpg, where)
                if rng is not None:
                    images[k] = augment_image(images[k], self.augment, rng)  # type: ignore[arg-type]
        except UserError as err:
            return str(err)
        return torch.from_numpy(images), torch.from_numpy(labels)

    def __len__(self) -> int:  # not used: tasks come from the sampler
        raise TypeError("BatchDecoder is indexed by tasks")


# what the forkserver imports once, not each worker; the guard first, so a kill during the slow
# imports is covered
WORKER_PRELOAD = ("shards.forkserver_guard", "torch", "cv2", "shards.torch_pipeline")


def _worker_context():
    import multiprocessing as mp

    os.environ[OWNER_ENV] = str(os.getpid())  # read by shards.forkserver_guard in the forkserver
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(WORKER_PRELOAD))
    return ctx


def _worker_init(owner: int, _: int) -> None:
    end_with_parent(os.getppid(), owner)  # no orphan worker after a kill -9 (shards/lifeline.py)
    cv2.setNumThreads(1)  # one decode thread per worker process: the workers are the parallelism


class _TaskSampler(torch.utils.data.Sampler):
    """The current pass's tasks, replaced between passes: one DataLoader serves every epoch."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)


class BatchWorkers:
    """Decodes batch tasks in DataLoader worker processes, `run(tasks)` once per pass (epoch).

    persistent=True keeps the same workers for every pass (started at the first): without it each
    epoch starts its workers again (imports, forkserver start, the first decodes), a data wait the
    training step sees at every epoch boundary. A pass must be finished or closed before the next.

    Workers start from a forkserver (a clean single-threaded process that has imported this
    module), not by forking the caller: a fork of a process whose OpenCV/OpenMP/DALI thread pools
    are running can leave the child on a lock nobody will release (seen here: a worker hung in
    futex_wait after OpenCV work in the parent). Started in the thread that calls `run`.
    """

    def __init__(
        self,
        decoder: BatchDecoder,
        *,
        workers: int,
        prefetch: int,
        pin_memory: bool = False,
        persistent: bool = True,
    ) -> None:
        self.decoder, self.workers, self.prefetch = decoder, workers, prefetch
        self.pin_memory, self.persistent = pin_memory, persistent
        self.sampler = _TaskSampler()
        self.loader: torch.utils.data.DataLoader | None = None
        self.active = False  # a pass is being iterated

    def _dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.decoder,
            batch_size=None,
            sampler=self.sampler,
            num_workers=self.workers,
            prefetch_factor=max(1, self.prefetch),
            worker_init_fn=functools.partial(_worker_init, os.getpid()),
            pin_memory=self.pin_memory,
            multiprocessing_context=_worker_context(),
            persistent_workers=self.persistent,
        )

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 [B, H, W, 3], int64 [B]) CPU tensors for each task, in task order."""
        if self.workers <= 0:
            return (_check(self.decoder[task]) for task in tasks)
        if not tasks:
            return iter(())
        if self.active:  # the previous pass was abandoned unclosed: its workers may still send
            self.close()
        self.sampler.tasks = list(tasks)
        if self.loader is None:
            self.loader = self._dataloader()
        it = iter(self.loader)  # starts the workers (the first time, or every time if not persistent)
        self.active = True
        return self._checked(it)

    def _checked(self, it) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for item in it:
                yield _check(item)
        except UserError:
            # A worker met a damaged sample: the pass is over. Stop its workers now (persistent or
            # not); left to the garbage collector, an abandoned pass's shutdown waited 5 s.
            it._shutdown_workers()
            self.loader = None
            raise
        finally:
            self.active = False

    def close(self) -> None:
        """Stops the workers now (persistent ones otherwise live as long as this object)."""
        it = getattr(self.loader, "_iterator", None)  # where DataLoader keeps persistent workers
        if it is not None:
            it._shutdown_workers()
        self.loader, self.active = None, False


def iter_uint8_batches(
    decoder: BatchDecoder, tasks: Sequence[Task], *, workers: int, prefetch: int, pin_memory: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over `tasks` with workers of its own (see BatchWorkers), for one-off reads."""
    return BatchWorkers(
        decoder, workers=min(workers, len(tasks)), prefetch=prefetch, pin_memory=pin_memory, persistent=False
    ).run(tasks)


def _check(item):
    if isinstance(item, str):
        raise UserError(item)
    return item


def to_model_input(
    images: torch.Tensor, device: torch.device, channels_last: bool, non_blocking: bool = False
) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] on `device`, (x / 255 - 0.5) / 0.5."""
    x = images.to(device, non_blocking=non_blocking).permute(0, 3, 1, 2).float()  # channels-last strides
    if not channels_last:
        x = x.contiguous()
    return x.div_(127.5).sub_(1.0)


class DevicePrefetcher:
    """Runs a batch iterator in a background thread, `depth` batches ahead of the consumer, and hands
    out model-ready (images, labels) on the device. On CUDA the copies run on a side stream and the
    consumer's stream waits on an event, so the step never blocks on a host-to-device copy.
    """

    _END = object()

    def __init__(
        self,
        source: Iterator[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        channels_last: bool,
        depth: int = 2,
    ):
        self.source, self.device, self.channels_last = source, device, channels_last
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.thread = threading.Thread(target=self._run, name="facetrain-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for images, labels in self.source:
                if self.cuda:
                    with torch.cuda.stream(self.stream):
                        x = to_model_input(images, self.device, self.channels_last, non_blocking=True)
                        y = labels.to(self.device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(self.stream)
                else:
                    x, y, event = to_model_input(images, self.device, self.channels_last), labels, None
                if not self._put((x, y, event)):
                    return
            self._put(self._END)
        except BaseException as err:  # re-raised in the consumer's thread
            self._put(err)
        finally:
            close = getattr(self.source, "close", None)
            if close is not None:
                close()  # shuts the DataLoader's workers down from the thread that iterated it

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            while True:
                item = self.queue.get()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                x, y, event = item
                if event is not None:
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(event)
                    x.record_stream(stream)
                    y.record_stream(stream)
                yield x, y
        finally:
            self.close()

    def close(self) -> None:
        self.stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=10)
