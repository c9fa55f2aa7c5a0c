"""The DALI reader: the same per-rank sample order as the torch backend, fed to DALI by an external
source that reads JPEG bytes by offset (shards/sample_index.py), then decode, augmentation and
normalization inside the DALI pipeline.

On a GPU the decode is `fn.decoders.image(device="mixed")` (nvJPEG) and every image operator runs
on the GPU; without one the same graph runs with CPU operators and `device_id=None`. Output:
float32 NCHW (or channels-last strides) on the device, and int64 labels.

Why not `fn.readers.webdataset` with `shard_id/num_shards`: it splits a set by contiguous sample
ranges, shuffles only inside a buffer and pads or wraps each rank's part on its own, so the
exact-once, equal-count split of docs/CONTRACTS.md (and resuming at a batch) cannot be expressed with it.

One pipeline serves consecutive epochs (`DaliBatches`: a pass per epoch, DALI's reset between
them); a resume at another position builds a new one (tenths of a second). The external source
runs in the training process or, with `source_workers`, in DALI's parallel-source processes
(spawned), which compute their batches from (epoch, batch number) themselves
(shards/dali_source.py). The pipeline holds no random operator: the
augmentation's choices (crop box, colour factors, blur, erase box, flip) are drawn on the host per
batch from the batch's seed words by shards/augment.py, the same draws the torch backend makes, and
fed in as per-sample operator arguments. So a run resumed at batch k yields the same pixels as the
uninterrupted run (up to floating-point reduction order, which DALI's CPU operators keep fixed),
and the two backends apply the same choices with their own implementations.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from common.cli import UserError
from shards.augment import ERASE_FILL, AugmentConfig
from shards.dali_source import BatchSource
from shards.sample_index import RankPlan, SampleReader, SampleTable


def dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # a missing wheel or a broken install: use the torch backend
        return False
    return True


def dali_sees_gpu() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from nvidia.dali.backend import GetCUDADeviceCount
    except Exception:
        return False
    try:
        return GetCUDADeviceCount() > 0
    except Exception:
        return False


def _augment(images, arg: dict, aug: AugmentConfig, image_size: tuple[int, int]):
    """The DALI operators of the training augmentation, in shards/augment.py's order; the flip is
    left to crop_mirror_normalize. Operators for steps that are off are left out of the graph."""
    from nvidia.dali import fn, types

    h, w = image_size
    if aug.crop_scale:
        images = fn.resize(
            images,
            size=[h, w],
            roi_start=arg["roi_start"],
            roi_end=arg["roi_end"],
            roi_relative=False,
            interp_type=types.INTERP_LINEAR,
            antialias=False,
        )
    if aug.color_jitter or aug.grayscale_p:
        images = fn.color_twist(
            images, brightness=arg["brightness"], contrast=arg["contrast"], saturation=arg["saturation"]
        )
    if aug.blur_p:
        images = fn.gaussian_blur(images, sigma=arg["sigma"])
    if aug.erase_p:
        images = fn.erase(
            images,
            anchor=arg["erase_anchor"],
            shape=arg["erase_shape"],
            axis_names="HW",
            fill_value=float(ERASE_FILL),
        )
    return images


def _build(
    source: BatchSource,
    *,
    image_size: tuple[int, int],
    batch_size: int,
    gpu: bool,
    device_id: int | None,
    threads: int,
    source_workers: int,
    prefetch: int,
    channels_last: bool,
):
    from nvidia.dali import fn, pipeline_def, types

    parallel = source_workers > 0
    # The source's workers are spawned, not forked: a fork after CUDA (or any thread pool) started
    # is unsafe; spawn re-imports the main module (guarded by `if __name__ == "__main__"`).
    pool = {"py_num_workers": source_workers, "py_start_method": "spawn"} if parallel else {}
    # each worker builds whole batches: keep every worker busy `prefetch` batches ahead
    ahead = {"prefetch_queue_depth": max(1, prefetch) * source_workers} if parallel else {}

    @pipeline_def(
        batch_size=batch_size,
        num_threads=max(1, threads),
        device_id=device_id,
        seed=0,  # unused: no operator draws (the draws come with the batch)
        prefetch_queue_depth=max(1, prefetch),
        exec_async=True,
        exec_pipelined=True,
        **pool,
    )
    def pipe():
        names = source.names
        jpegs, labels, *args = fn.external_source(
            source=source,
            num_outputs=2 + len(names),
            batch=True,
            batch_info=True,
            parallel=parallel,
            dtype=[types.UINT8, types.INT32] + [types.INT32 if n == "mirror" else types.FLOAT for n in names],
            **ahead,
        )
        arg = dict(zip(names, args, strict=True))
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = _augment(images, arg, source.augment, image_size)
        mirror = arg.get("mirror", 0)
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="HWC" if channels_last else "CHW",
            mean=[127.5] * 3,
            std=[127.5] * 3,
            mirror=mirror,
        )
        if gpu:
            labels = labels.gpu()
        return images, labels

    p = pipe()
    p.build()
    return p


def _name_bad_sample(source: BatchSource, epoch: int, first: int, count: int) -> str | None:
    """After DALI failed: read and decode batches first .. first + count - 1 of the epoch with
    OpenCV (the batch being delivered and those the pipeline was preparing) to name the bad file."""
    from shards.torch_pipeline import decode_into

    out = np.empty((*source.image_size, 3), dtype=np.uint8)
    table = source.reader.table
    for k in range(first, min(first + count, source.plan.batches_per_epoch)):
        for i in source.task(epoch, k)[1]:
            try:
                jpg, _ = source.reader.read(int(i))
                decode_into(out, jpg, f"{table.shard_paths[table.shard[i]]} (sample {int(i)})")
            except UserError as err:
                return str(err)
    return None


def _user_error_in(err: BaseException) -> UserError | None:
    """The UserError somewhere in an exception's chain of causes, if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return None


class DaliBatches:
    """A DALI pipeline over this rank's batches, one pass per epoch from `first_epoch` on (the first
    from `start_batch`). The pipeline and its source workers stay up between passes: the next pass
    is the next epoch (`continues` says whether a wanted position is that one)."""

    def __init__(
        self,
        table: SampleTable,
        plan: RankPlan,
        *,
        first_epoch: int,
        start_batch: int,
        image_size: tuple[int, int],
        augment: AugmentConfig | None,
        device: torch.device,
        channels_last: bool,
        threads: int,
        source_workers: int,
        prefetch: int,
    ) -> None:
        self.gpu = device.type == "cuda"
        device_id = (
            (device.index if device.index is not None else torch.cuda.current_device()) if self.gpu else None
        )
        self.source = BatchSource(
            SampleReader(table),
            plan,
            first_epoch,
            start_batch,
            augment or AugmentConfig(flip=False),
            image_size,
        )
        self.channels_last = channels_last
        # batches the pipeline may be preparing beyond the one delivered, where a failure may lie
        self.in_flight = 2 + max(1, prefetch) * (1 + source_workers)
        self.pipe = _build(
            self.source,
            image_size=image_size,
            batch_size=plan.batch_size,
            gpu=self.gpu,
            device_id=device_id,
            threads=threads,
            source_workers=source_workers,
            prefetch=prefetch,
            channels_last=channels_last,
        )
        self.iterator = None
        self.passes = 0  # passes run to their end
        self.between = True  # no pass is half-read (the pipeline can start the next one)

    def continues(self, epoch: int, start_batch: int) -> bool:
        """Whether the next pass yields exactly (epoch, start_batch ..): the following whole epoch."""
        return self.between and (epoch, start_batch) == self.source.position(self.passes, 0)

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Model-ready (images, labels) on the device for each batch of the next pass."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        epoch, first = self.source.position(self.passes, 0)
        if first >= self.source.plan.batches_per_epoch:
            return
        self.between = False
        k = first
        while True:
            try:
                if self.iterator is None:  # the iterator runs the first batch in its constructor
                    self.iterator = DALIGenericIterator([self.pipe], ["images", "labels"], auto_reset=False)
                out = next(self.iterator)[0]
            except StopIteration:
                self.iterator.reset()  # type: ignore[union-attr]
                self.passes, self.between = self.passes + 1, True
                return
            except UserError:
                raise
            except Exception as err:  # DALI wraps what the source raised (a worker's in an Exception)
                cause = _user_error_in(err)
                if cause is not None:
                    raise cause from None
                named = _name_bad_sample(self.source, epoch, k, self.in_flight)
                if named is not None:
                    raise UserError(named) from None
                raise
            images = out["images"]
            if self.channels_last:
                images = images.permute(0, 3, 1, 2)  # NCHW view with channels-last strides
            k += 1
            yield images, out["labels"].view(-1).long()

    def close(self) -> None:
        """Stops the pipeline and its source workers."""
        self.iterator = None
        pipe, self.pipe = self.pipe, None
        if pipe is not None:  # DALI has no public close: what its finalizers call, now
            pool = getattr(pipe, "_py_pool", None)
            pipe._shutdown()
            if pool is not None:
                pool.close()
        self.source.reader.close()
