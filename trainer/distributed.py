"""Process group set-up from torchrun's environment: NCCL on GPUs, gloo on the CPU."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from common.cli import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _pick_device(local_rank: int, devices: list[int] | str) -> torch.device:
    if devices == "cpu" or not torch.cuda.is_available():
        if isinstance(devices, list) and devices:
            raise UserError(f"run.devices={devices}: GPUs asked for but CUDA is not available here")
        return torch.device("cpu")
    ids = list(range(torch.cuda.device_count())) if devices == "auto" else list(devices)
    if local_rank >= len(ids):
        raise UserError(f"run.devices={devices}: local rank {local_rank} has no GPU in that list")
    if ids[local_rank] >= torch.cuda.device_count():
        raise UserError(
            f"run.devices: GPU {ids[local_rank]} does not exist ({torch.cuda.device_count()} visible)"
        )
    return torch.device("cuda", ids[local_rank])


def setup(devices: list[int] | str = "auto", timeout_s: float = 300.0) -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun) or run as one process; init the process group.

    `timeout_s` bounds every collective: a rank that waits that long for a peer (one that hangs;
    one that died breaks gloo's connections at once) raises, and torchrun then ends the job."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(local, devices)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = DistInfo(rank, world, local, device)
    if world > 1:
        info.backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=info.backend,
            device_id=device if device.type == "cuda" else None,
            timeout=timedelta(seconds=timeout_s),
        )
    return info


class PeerLost(RuntimeError):
    """A collective failed: another process died or stalled past the timeout (one line)."""


def peer_lost(err: BaseException, info: DistInfo, timeout_s: float) -> PeerLost | None:
    """The one-line PeerLost for a failed collective (gloo and NCCL raise RuntimeErrors naming
    themselves), else None: any other error is a bug and keeps its traceback."""
    text = str(err)
    if not info.enabled or not isinstance(err, RuntimeError):
        return None
    if not (isinstance(err, dist.DistError) or "gloo" in text or "NCCL" in text):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return PeerLost(
        f"rank {info.rank} stops: a collective failed ({first[:160]}); another process died or "
        f"stalled (each waits at most run.collective_timeout_s={timeout_s:g} s)"
    )


def teardown(info: DistInfo, sync: bool = True) -> None:
    """Collect garbage before destroying the group (the caller has dropped its model and optimizer):
    gloo teardown aborts now and then while DDP reducer buckets are still alive. `sync` False (the run
    failed): no final barrier, which would wait for peers that may be gone."""
    gc.collect()
    if info.enabled and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def all_true(flag: bool, info: DistInfo) -> bool:
    if not info.enabled:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=info.device)
    dist.all_reduce(t)
    return t.item() == 0.0


def mean_over_ranks(values: list[float], info: DistInfo) -> list[float]:
    """The mean of each value over the ranks (float64), the same list on every rank."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


def broadcast_float(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.broadcast(t, 0)
    return float(t.item())


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
