"""The DALI reader: the same per-rank sample order as the torch backend, fed to DALI by an external
source that reads JPEG bytes by offset (shards/sample_index.py), then decode, augmentation and
normalization inside the DALI pipeline.

On a GPU the decode is `fn.decoders.image(device="mixed")` (nvJPEG) and every image operator runs
on the GPU; without one the same graph runs with CPU operators and `device_id=None`. Output:
float32 NCHW (or channels-last strides) on the device, and int64 labels.

Why not `fn.readers.webdataset` with `shard_id/num_shards`: it splits a set by contiguous sample
ranges, shuffles only inside a buffer and pads or wraps each rank's part on its own, so the
exact-once, equal-count split of DESIGN.md (and resuming at a batch) cannot be expressed with it.

One pipeline is built per epoch (tenths of a second). It holds no random operator: the
augmentation's choices (crop box, colour factors, blur, erase box, flip) are drawn on the host per
batch from the batch's seed words by shards/augment.py, the same draws the torch backend makes, and
fed in as per-sample operator arguments. So a run resumed at batch k yields the same pixels as the
uninterrupted run (up to floating-point reduction order, which DALI's CPU operators keep fixed),
and the two backends apply the same choices with their own implementations.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from shards.augment import ERASE_FILL, AugmentConfig, AugmentDraw, draw_augment
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
    """External-source callback: one batch per call, then StopIteration.

    Each call returns the JPEG bytes and int32 labels and, per sample, the augmentation's random
    choices as operator arguments (those `argument_names(augment)` lists), drawn on the host from
    the task's seed words by shards/augment.py exactly as the torch backend draws them. The
    pipeline itself draws nothing, so a batch's output follows from its task alone.
    """

    def __init__(self, reader: SampleReader, tasks: Sequence[Task], augment: AugmentConfig,
                 image_size: tuple[int, int]):
        self.reader, self.augment, self.image_size = reader, augment, image_size
        self.names = argument_names(augment)
        self.tasks = iter(tasks)
        self.recent: collections.deque[np.ndarray] = collections.deque(maxlen=16)  # to name a bad file

    def __call__(self):
        seed_words, indices = next(self.tasks)
        self.recent.append(indices)
        jpgs, labels = [], []
        for i in indices:
            jpg, label = self.reader.read(int(i))
            jpgs.append(np.frombuffer(jpg, dtype=np.uint8))
            labels.append(np.array([label], dtype=np.int32))
        h, w = self.image_size
        rng = np.random.default_rng(list(seed_words))
        draws = [_arguments(draw_augment(self.augment, h, w, rng), h, w) for _ in indices]
        return (jpgs, labels, *([d[name] for d in draws] for name in self.names))


def argument_names(aug: AugmentConfig) -> list[str]:
    """The per-sample operator arguments the steps that are on take, in a fixed order."""
    steps = [(aug.crop_scale, ["roi_start", "roi_end"]),
             (aug.color_jitter or aug.grayscale_p, ["brightness", "contrast", "saturation"]),
             (aug.blur_p, ["sigma"]), (aug.erase_p, ["erase_anchor", "erase_shape"]),
             (aug.flip, ["mirror"])]
    return [name for on, names in steps if on for name in names]


def _arguments(d: AugmentDraw, h: int, w: int) -> dict[str, np.ndarray]:
    """One draw as DALI argument values (float32; the mirror flag int32)."""
    y, x, ch, cw = d.crop if d.crop is not None else (0, 0, h, w)
    bright, contrast, sat = d.color if d.color is not None else (1.0, 1.0, 1.0)
    ey, ex, eh, ew = d.erase if d.erase is not None else (0, 0, 0, 0)  # an empty region: no erase
    f32 = np.float32
    return {
        "roi_start": np.array([y, x], f32), "roi_end": np.array([y + ch, x + cw], f32),
        "brightness": np.array(bright, f32), "contrast": np.array(contrast, f32),
        "saturation": np.array(0.0 if d.gray else sat, f32),
        # sigma ~0 is an exact identity (3-tap window with weights 0, 1, 0): blur without a branch
        "sigma": np.array(d.blur_sigma if d.blur_sigma is not None else 1e-3, f32),
        "erase_anchor": np.array([ey, ex], f32), "erase_shape": np.array([eh, ew], f32),
        "mirror": np.array(int(d.flip), np.int32),
    }


def _augment(images, arg: dict, aug: AugmentConfig, image_size: tuple[int, int]):
    """The DALI operators of the training augmentation, in shards/augment.py's order; the flip is
    left to crop_mirror_normalize. Operators for steps that are off are left out of the graph."""
    from nvidia.dali import fn, types

    h, w = image_size
    if aug.crop_scale:
        images = fn.resize(images, size=[h, w], roi_start=arg["roi_start"], roi_end=arg["roi_end"],
                           roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=False)
    if aug.color_jitter or aug.grayscale_p:
        images = fn.color_twist(images, brightness=arg["brightness"], contrast=arg["contrast"],
                                saturation=arg["saturation"])
    if aug.blur_p:
        images = fn.gaussian_blur(images, sigma=arg["sigma"])
    if aug.erase_p:
        images = fn.erase(images, anchor=arg["erase_anchor"], shape=arg["erase_shape"],
                          axis_names="HW", fill_value=float(ERASE_FILL))
    return images


def _build(
    source: _Source,
    *,
    image_size: tuple[int, int],
    batch_size: int,
    gpu: bool,
    device_id: int | None,
    threads: int,
    prefetch: int,
    channels_last: bool,
):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(
        batch_size=batch_size,
        num_threads=max(1, threads),
        device_id=device_id,
        seed=0,  # unused: no operator draws (the draws come with the batch)
        prefetch_queue_depth=max(1, prefetch),
        exec_async=True,
        exec_pipelined=True,
    )
    def pipe():
        names = source.names
        jpegs, labels, *args = fn.external_source(
            source=source, num_outputs=2 + len(names), batch=True,
            dtype=[types.UINT8, types.INT32] + [types.INT32 if n == "mirror" else types.FLOAT for n in names],
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
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Model-ready (images, labels) on `device` for each task (each a full batch of `batch_size`)."""
    if not tasks:
        return
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    gpu = device.type == "cuda"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    source = _Source(SampleReader(table), tasks, augment or AugmentConfig(flip=False), image_size)
    try:
        pipe = _build(
            source,
            image_size=image_size,
            batch_size=batch_size,
            gpu=gpu,
            device_id=device_id,
            threads=threads,
            prefetch=prefetch,
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
