"""Run by tests/shards/test_loader_dist.py under `torchrun --nproc_per_node=2` (gloo, CPU).

Each rank reads two epochs with each backend and writes what it saw (labels, which are unique per
sample in that test's shards) to OUT/rank{r}.json. A gloo all_reduce after every batch would hang
(and the test time out) if the ranks did not get the same number of batches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from shards.augment import AugmentConfig
from shards.loader import build_train_loader
from shards.manifest import load_manifest


def main() -> int:
    shard_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    manifest = load_manifest(shard_dir)
    seen: dict[str, object] = {"rank": rank}
    for backend in ("torch", "dali"):
        loader = build_train_loader(
            manifest,
            batch_size=8,
            rank=rank,
            world_size=world,
            seed=3,
            backend=backend,
            workers=1,
            augment=AugmentConfig(flip=True),
        )
        seen[f"{backend}_len"] = len(loader)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            labels = []
            for images, y in loader:
                assert images.shape == (8, 3, 112, 112) and y.dtype == torch.int64
                labels.append(y.tolist())
                dist.all_reduce(torch.ones(1))  # a rank with fewer batches would leave this hanging
            seen[f"{backend}_e{epoch}"] = labels
    dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
