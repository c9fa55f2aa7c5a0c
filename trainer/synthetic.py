"""An in-memory synthetic training set with the TrainLoader interface (shards/loader.py).

Each class is a smooth random pattern; its samples add fixed per-sample noise. Used by tests (no
shards needed) and by GPU throughput checks on machines without DALI or data.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F


class SyntheticLoader:
    backend = "synthetic"

    def __init__(
        self,
        num_classes: int,
        per_class: int,
        image_size: tuple[int, int],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        noise: float = 0.5,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        h, w = image_size
        protos = F.interpolate(
            torch.rand(num_classes, 3, 8, 8, generator=g) * 2 - 1,
            size=(h, w),
            mode="bilinear",
            align_corners=False,
        )
        n = num_classes * per_class
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        images = protos[labels] + noise * torch.randn(n, 3, h, w, generator=g)
        self.images = images.clamp(-1, 1).to(device)
        if channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = labels.to(device)
        self.num_classes, self.image_size = num_classes, (h, w)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.batches_per_epoch = (n // world_size) // batch_size
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(len(self.labels), generator=g)[self.rank :: self.world_size]
        order = order.to(self.labels.device)
        for b in range(self.start_batch, self.batches_per_epoch):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.images[idx], self.labels[idx]
