"""The DALI pipeline's external source: the batches' JPEG bytes, labels and augmentation arguments.

A module of its own, importing neither torch nor DALI: with `loader.source_workers` the source runs
in processes DALI spawns, and each imports this module (a second or two less per worker without
torch).
"""

from __future__ import annotations

import numpy as np

from shards.augment import AugmentConfig, AugmentDraw, draw_augment
from shards.sample_index import RankPlan, SampleReader, Task


class BatchSource:
    """External-source callback: batch `iteration` of the pipeline's pass `epoch_idx` (DALI's BatchInfo),
    i.e. of epoch `first_epoch + epoch_idx`, the first pass starting at `start_batch`; StopIteration
    after the epoch's last batch.

    Each call returns the JPEG bytes and int32 labels and, per sample, the augmentation's random
    choices as operator arguments (those `argument_names(augment)` lists), drawn on the host from
    the task's seed words by shards/augment.py exactly as the torch backend draws them. The
    pipeline itself draws nothing, so a batch's output follows from its task alone. The batch
    follows from (epoch, batch number) alone too, so DALI's source workers (other processes, each
    given a pickled copy) compute their batches themselves.
    """

    def __init__(
        self,
        reader: SampleReader,
        plan: RankPlan,
        first_epoch: int,
        start_batch: int,
        augment: AugmentConfig,
        image_size: tuple[int, int],
    ):
        self.reader, self.plan, self.augment, self.image_size = reader, plan, augment, image_size
        self.first_epoch, self.start_batch = first_epoch, start_batch
        self.names = argument_names(augment)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its sample order), per process

    def position(self, epoch_idx: int, iteration: int) -> tuple[int, int]:
        """(epoch, batch number) of a pass's iteration."""
        return self.first_epoch + epoch_idx, iteration + (self.start_batch if epoch_idx == 0 else 0)

    def task(self, epoch: int, k: int) -> Task:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.plan.order(epoch))
        return self.plan.task(epoch, k, self._order[1])

    def __call__(self, info):
        epoch, k = self.position(info.epoch_idx, info.iteration)
        if k >= self.plan.batches_per_epoch:
            raise StopIteration
        seed_words, indices = self.task(epoch, k)
        jpgs, labels = [], []
        for i in indices:
            jpg, label = self.reader.read(int(i))
            jpgs.append(np.frombuffer(jpg, dtype=np.uint8))
            labels.append(np.array([label], dtype=np.int32))
        h, w = self.image_size
        rng = np.random.default_rng(list(seed_words))
        draws = [_arguments(draw_augment(self.augment, h, w, rng), h, w) for _ in indices]
        return (jpgs, labels, *([d[name] for d in draws] for name in self.names))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_order": None}


def argument_names(aug: AugmentConfig) -> list[str]:
    """The per-sample operator arguments the steps that are on take, in a fixed order."""
    steps = [
        (aug.crop_scale, ["roi_start", "roi_end"]),
        (aug.color_jitter or aug.grayscale_p, ["brightness", "contrast", "saturation"]),
        (aug.blur_p, ["sigma"]),
        (aug.erase_p, ["erase_anchor", "erase_shape"]),
        (aug.flip, ["mirror"]),
    ]
    return [name for on, names in steps if on for name in names]


def _arguments(d: AugmentDraw, h: int, w: int) -> dict[str, np.ndarray]:
    """One draw as DALI argument values (float32; the mirror flag int32)."""
    y, x, ch, cw = d.crop if d.crop is not None else (0, 0, h, w)
    bright, contrast, sat = d.color if d.color is not None else (1.0, 1.0, 1.0)
    ey, ex, eh, ew = d.erase if d.erase is not None else (0, 0, 0, 0)  # an empty region: no erase
    f32 = np.float32
    return {
        "roi_start": np.array([y, x], f32),
        "roi_end": np.array([y + ch, x + cw], f32),
        "brightness": np.array(bright, f32),
        "contrast": np.array(contrast, f32),
        "saturation": np.array(0.0 if d.gray else sat, f32),
        # sigma ~0 is an exact identity (3-tap window with weights 0, 1, 0): blur without a branch
        "sigma": np.array(d.blur_sigma if d.blur_sigma is not None else 1e-3, f32),
        "erase_anchor": np.array([ey, ex], f32),
        "erase_shape": np.array([eh, ew], f32),
        "mirror": np.array(int(d.flip), np.int32),
    }
