"""The DALI reader: the same per-rank sample order as the torch backend, fed to DALI by an external
source that reads JPEG bytes by offset (shards/sample_index.py), then decode, augmentation and
normalization inside the DALI pipeline.

On a GPU the decode is `fn.decoders.image(device="mixed")` (nvJPEG) and every image operator runs
on the GPU; without one the same graph runs with CPU operators and `device_id=None`. Output:
float32 NCHW (or channels-last strides) on the device, and int64 labels.

Why not `fn.readers.webdataset` with `shard_id/num_shards`: it splits a set by contiguous sample
ranges, shuffles only inside a buffer and pads or wraps each rank's part on its own, so the
exact-once, equal-count split of DESIGN.md (and resuming at a batch) cannot be expressed with it.

One pipeline is built per epoch (tenths of a second) with a seed from (seed, epoch, rank, first
batch), so DALI's random augmentation draws are reproducible for a given run and resume point; they
are not the same draws as the torch backend's.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from shards.augment import BLUR_SIGMA, CROP_ASPECT, ERASE_AREA, ERASE_FILL, AugmentConfig
from shards.errors import UserError
from shards.sample_index import SampleReader, SampleTable, Task


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


class _Source:
    """External-source callback: one batch of (JPEG bytes, int32 label) per call, then StopIteration."""

    def __init__(self, reader: SampleReader, tasks: Sequence[Task]):
        self.reader = reader
        self.tasks = iter(tasks)
        self.recent: collections.deque[np.ndarray] = collections.deque(maxlen=16)  # to name a bad file

    def __call__(self):
        _, indices = next(self.tasks)
        self.recent.append(indices)
        jpgs, labels = [], []
        for i in indices:
            jpg, label = self.reader.read(int(i))
            jpgs.append(np.frombuffer(jpg, dtype=np.uint8))
            labels.append(np.array([label], dtype=np.int32))
        return jpgs, labels


def _seed(words: Sequence[int]) -> int:
    return int(np.random.default_rng(list(words)).integers(0, 2**31 - 1))


def _coin(p: float):
    """1.0 with probability p, else 0.0 (coin_flip itself has no float output)."""
    from nvidia.dali import fn, types

    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)


def _augment(images, aug: AugmentConfig, image_size: tuple[int, int]):
    """The DALI operators of the training augmentation (shards/augment.py's settings), in its order."""
    from nvidia.dali import fn

    h, w = image_size
    if aug.crop_scale:
        images = fn.random_resized_crop(
            images, size=[h, w], random_area=list(aug.crop_scale), random_aspect_ratio=list(CROP_ASPECT)
        )
    if aug.color_jitter or aug.grayscale_p:
        j = aug.color_jitter
        sat = fn.random.uniform(range=[1 - j, 1 + j]) if j else 1.0
        if aug.grayscale_p:
            sat = sat * (1.0 - _coin(aug.grayscale_p))
        kw = {"brightness": fn.random.uniform(range=[1 - j, 1 + j]),
              "contrast": fn.random.uniform(range=[1 - j, 1 + j])} if j else {}
        images = fn.color_twist(images, saturation=sat, **kw)
    if aug.blur_p:
        # sigma ~0 is an exact identity (3-tap window with weights 0, 1, 0): blur without a branch
        hit = _coin(aug.blur_p)
        sigma = hit * fn.random.uniform(range=list(BLUR_SIGMA)) + (1.0 - hit) * 1e-3
        images = fn.gaussian_blur(images, sigma=sigma)
    if aug.erase_p:
        hit = _coin(aug.erase_p)
        side = fn.random.uniform(
            range=[float(np.sqrt(ERASE_AREA[0])), float(np.sqrt(ERASE_AREA[1]))], shape=[2]
        )
        anchor = fn.random.uniform(range=[0.0, 1.0], shape=[2]) * (1.0 - side)
        images = fn.erase(images, anchor=anchor, shape=side * hit,  # an empty region when not erasing
                          axis_names="HW", normalized_anchor=True, normalized_shape=True,
                          fill_value=float(ERASE_FILL))
    return images


def _build(
    source: _Source,
    *,
    image_size: tuple[int, int],
    augment: AugmentConfig | None,
    batch_size: int,
    gpu: bool,
    device_id: int | None,
    threads: int,
    prefetch: int,
    seed: int,
    channels_last: bool,
):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(
        batch_size=batch_size,
        num_threads=max(1, threads),
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=max(1, prefetch),
        exec_async=True,
        exec_pipelined=True,
    )
    def pipe():
        jpegs, labels = fn.external_source(
            source=source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT32]
        )
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        aug = augment or AugmentConfig(flip=False)
        images = _augment(images, aug, image_size)
        mirror = fn.random.coin_flip(probability=0.5) if aug.flip else 0
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


def _name_bad_sample(source: _Source, image_size: tuple[int, int]) -> str | None:
    """After DALI failed: decode the recently fed samples with OpenCV to name the bad file."""
    from shards.torch_pipeline import decode_into

    out = np.empty((*image_size, 3), dtype=np.uint8)
    for indices in source.recent:
        for i in indices:
            jpg, _ = source.reader.read(int(i))
            try:
                decode_into(
                    out,
                    jpg,
                    f"{source.reader.table.shard_paths[source.reader.table.shard[i]]} (sample {int(i)})",
                )
            except UserError as err:
                return str(err)
    return None


def iter_dali_batches(
    table: SampleTable,
    tasks: Sequence[Task],
    *,
    image_size: tuple[int, int],
    batch_size: int,
    augment: AugmentConfig | None,
    device: torch.device,
    channels_last: bool,
    threads: int,
    prefetch: int,
    seed_words: Sequence[int],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Model-ready (images, labels) on `device` for each task (each a full batch of `batch_size`)."""
    if not tasks:
        return
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    gpu = device.type == "cuda"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    source = _Source(SampleReader(table), tasks)
    try:
        pipe = _build(
            source,
            image_size=image_size,
            augment=augment,
            batch_size=batch_size,
            gpu=gpu,
            device_id=device_id,
            threads=threads,
            prefetch=prefetch,
            seed=_seed(seed_words),
            channels_last=channels_last,
        )
        it = None
        while True:
            try:
                if it is None:  # the iterator runs the first batch in its constructor
                    it = DALIGenericIterator([pipe], ["images", "labels"], auto_reset=False)
                out = next(it)[0]
            except StopIteration:
                return
            except UserError:
                raise
            except RuntimeError as err:
                cause = err.__cause__ or err.__context__
                if isinstance(cause, UserError):
                    raise cause from None
                named = _name_bad_sample(source, image_size)
                if named is not None:
                    raise UserError(named) from None
                raise
            images = out["images"]
            if channels_last:
                images = images.permute(0, 3, 1, 2)  # NCHW view with channels-last strides
            yield images, out["labels"].view(-1).long()
    finally:
        source.reader.close()
