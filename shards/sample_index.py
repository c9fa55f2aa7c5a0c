"""Random access to the samples of a shard set, and the per-rank, per-epoch sample order.

Both training backends read samples by byte offset, using the DALI `.idx` files the writer puts
beside each tar, instead of streaming the tars. Random access is what makes an exact split
possible: one global permutation per epoch, cut into equal rank slices, with no dependence on how
samples happen to be spread over shards (streaming readers split by shard or wrap around, and
then ranks see different counts or repeat samples). The cost is a seek per sample, which is cheap
on SSDs and the page cache, which is where training sets of face crops live.

Epoch order (`epoch_order`): the N samples are permuted with a generator seeded by
(seed, epoch); the permutation is padded by wrapping around to its own beginning up to a multiple
of world_size * batch_size, and rank r takes every world_size-th sample starting at r. So every
rank gets ceil(N / (world_size * batch_size)) full batches; over an epoch every sample is seen
exactly once across ranks, except the `pad = batches * world * batch - N` samples at the start of
the permutation, which are seen twice (once more in the last global batch). The padding samples
change every epoch with the permutation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.errors import UserError
from shards.format import decode_label
from shards.manifest import Manifest

_BLOCK = 512  # tar header size


@dataclass
class SampleTable:
    """Where each sample's image and label bytes are: one row per sample, in shard order."""

    shard_paths: list[Path]
    shard: np.ndarray  # int32 [N] index into shard_paths
    jpg_offset: np.ndarray  # int64 [N] offset of the JPEG data in the tar
    jpg_size: np.ndarray  # int64 [N]
    lbl_offset: np.ndarray  # int64 [N] offset of the 4-byte label data
    keys: list[str] | None  # sample keys, kept only when asked (evaluation)

    def __len__(self) -> int:
        return len(self.shard)


def _parse_index(idx_path: Path, tar_path: Path, expected: int, want_keys: bool):
    try:
        lines = idx_path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{idx_path}: unreadable DALI index ({err})") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[0].startswith("v1.") or not head[1].isdigit():
        raise UserError(f"{idx_path}: not a DALI webdataset index (first line {lines[:1]!r})")
    body = lines[1:]
    if int(head[1]) != len(body) or len(body) != expected:
        raise UserError(
            f"{idx_path}: index lists {len(body)} samples, header says {head[1]}, "
            f"the manifest says {expected} for {tar_path.name}"
        )
    rows = np.zeros((len(body), 3), dtype=np.int64)
    keys: list[str] = []
    for i, line in enumerate(body):
        parts = line.split()
        jpg = lbl = None
        for j in range(0, len(parts) - 3, 4):
            ext = parts[j]
            if ext == "jpg":
                jpg = (int(parts[j + 1]), int(parts[j + 2]), parts[j + 3])
            elif ext == "lbl":
                lbl = int(parts[j + 1])
        if jpg is None or lbl is None:
            raise UserError(f"{idx_path}: sample {i} has no jpg or no lbl member")
        rows[i] = (jpg[0], jpg[1], lbl)
        if want_keys:
            keys.append(jpg[2].rsplit("/", 1)[-1][: -len(".jpg")])
    return rows, keys


def build_sample_table(manifest: Manifest, want_keys: bool = False) -> SampleTable:
    """Read every shard's `.idx` (a few seconds for millions of samples; no tar is opened)."""
    parts, shard_ids, keys = [], [], []
    paths = manifest.shard_paths()
    for s, (info, tar, idx) in enumerate(zip(manifest.shards, paths, manifest.index_paths(), strict=True)):
        rows, k = _parse_index(idx, tar, info.samples, want_keys)
        if len(rows) and int(rows[:, 0].max() + rows[:, 1].max()) > info.bytes:
            raise UserError(f"{idx}: offsets point past the end of {tar.name} ({info.bytes} bytes)")
        parts.append(rows)
        shard_ids.append(np.full(len(rows), s, dtype=np.int32))
        keys.extend(k)
    rows = np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)
    return SampleTable(
        shard_paths=paths,
        shard=np.concatenate(shard_ids) if shard_ids else np.zeros(0, dtype=np.int32),
        jpg_offset=np.ascontiguousarray(rows[:, 0]),
        jpg_size=np.ascontiguousarray(rows[:, 1]),
        lbl_offset=np.ascontiguousarray(rows[:, 2]),
        keys=keys if want_keys else None,
    )


def _header_ok(header: bytes) -> bool:
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    actual = sum(header[:148]) + 8 * 32 + sum(header[156:])  # the checksum field counts as spaces
    name = header[:100].split(b"\0", 1)[0]
    return stored == actual and (name.endswith(b".jpg") or len(name) == 99)  # GNU long names: 99 chars


class SampleReader:
    """Reads (JPEG bytes, label) by index, one `pread` per sample; one per process (own descriptors)."""

    def __init__(self, table: SampleTable):
        self.table = table
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked into a DataLoader worker: open our own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = os.open(self.table.shard_paths[shard], os.O_RDONLY)
            except OSError as err:
                raise UserError(
                    f"{self.table.shard_paths[shard]}: cannot open shard ({err.strerror})"
                ) from None
            self._fds[shard] = fd
        return fd

    def read(self, i: int) -> tuple[bytes, int]:
        t = self.table
        shard = int(t.shard[i])
        start = int(t.jpg_offset[i]) - _BLOCK  # from the JPEG's own tar header to the label's last byte
        end = int(t.lbl_offset[i]) + 4
        data = os.pread(self._fd(shard), end - start, start)
        path = t.shard_paths[shard]
        if len(data) != end - start:
            raise UserError(
                f"{path}: truncated shard (sample {i} ends at byte {end}, file has {start + len(data)})"
            )
        if not _header_ok(data[:_BLOCK]):
            # the tar header just before the data must be intact and name a .jpg member: catches
            # overwritten bytes and an index that does not belong to this tar
            raise UserError(
                f"{path}: corrupt shard or stale index (bad tar header for sample {i} at byte {start})"
            )
        jpg = data[_BLOCK : _BLOCK + int(t.jpg_size[i])]
        label = decode_label(data[-4:])
        return jpg, label

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:  # picklable for spawn-started workers: descriptors reopen lazily
        return {"table": self.table, "_fds": {}, "_pid": -1}


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Full batches each rank yields per epoch (the last global batch is padded, see module docs)."""
    if batch_size < 1 or world_size < 1:
        raise ValueError("batch_size and world_size must be positive")
    per_step = batch_size * world_size
    return -(-num_samples // per_step) if num_samples else 0


def epoch_order(
    num_samples: int,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> np.ndarray:
    """This rank's sample indices for the epoch, int64 [batches_per_epoch * batch_size]."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    n_batches = batches_per_epoch(num_samples, batch_size, world_size)
    total = n_batches * batch_size * world_size
    if shuffle:
        perm = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)]).permutation(num_samples)
    else:
        perm = np.arange(num_samples)
    if total > num_samples:  # wrap around: the first `total - N` samples fill the last global batch
        perm = np.concatenate([perm, np.resize(perm, total - num_samples)])
    return perm[rank::world_size].astype(np.int64)
