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
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.cli import UserError
from shards.format import CRC_FIELD, CRC_MEMBERS, TAR_BLOCK, decode_label
from shards.manifest import Manifest

# A batch task: (seed words for its generator, sample indices). The seed words make the
# augmentation of a batch depend only on (seed, epoch, rank, batch number). Both pipelines take these.
Task = tuple[tuple[int, ...], np.ndarray]

_COLUMNS = ("jpg_offset", "jpg_size", "lbl_offset", "json_offset", "json_size")


@dataclass
class SampleTable:
    """Where each sample's members are: one row per sample, in shard order."""

    shard_paths: list[Path]
    shard: np.ndarray  # int32 [N] index into shard_paths
    jpg_offset: np.ndarray  # int64 [N] offset of the JPEG data in the tar
    jpg_size: np.ndarray  # int64 [N]
    lbl_offset: np.ndarray  # int64 [N] offset of the 4-byte label data
    json_offset: np.ndarray  # int64 [N] offset of the JSON record (it follows the label)
    json_size: np.ndarray  # int64 [N]
    keys: list[str] | None  # sample keys, kept only when asked (evaluation)
    num_classes: int | None = None  # labels outside 0..num_classes-1 are refused when read

    def __len__(self) -> int:
        return len(self.shard)


def _index_row(fields: list[str], where: str, tar_bytes: int) -> tuple[tuple[int, ...], str]:
    """One `.idx` line, groups of `ext offset size name`, as (jpg offset, size, lbl offset, json
    offset, size) and the sample key. Every offset and size is checked against the tar's `tar_bytes`
    and the layout a tar has (each member's data after its own 512-byte header, after the member
    before it), so a reader can use them without another check."""
    if not fields or len(fields) % 4:
        raise UserError(f"{where}: expected groups of 'ext offset size name', got {len(fields)} fields")
    members = {}
    for j in range(0, len(fields), 4):
        ext, offset, size, name = fields[j : j + 4]
        if not (offset.isdigit() and size.isdigit()):
            raise UserError(f"{where}: offset and size of the {ext!r} member must be integers")
        members[ext] = (int(offset), int(size), name)
        if members[ext][0] + members[ext][1] > tar_bytes:
            raise UserError(
                f"{where}: the {ext} member (offset {offset}, {size} bytes) runs past the end "
                f"of the tar ({tar_bytes} bytes)"
            )
    if "jpg" not in members or "lbl" not in members:
        raise UserError(f"{where}: the sample has no jpg or no lbl member")
    jpg, lbl = members["jpg"], members["lbl"]
    record = members.get("json", (lbl[0] + 4, 0, ""))
    if (
        lbl[1] != 4
        or jpg[0] < TAR_BLOCK
        or lbl[0] < jpg[0] + jpg[1] + TAR_BLOCK
        or (record[1] and record[0] < lbl[0] + 4 + TAR_BLOCK)
    ):
        raise UserError(
            f"{where}: members are not laid out as in a tar (jpg, lbl of 4 bytes, json, "
            "each after its 512-byte header): offsets and sizes overlap"
        )
    key = jpg[2].rsplit("/", 1)[-1][: -len(".jpg")]
    return (jpg[0], jpg[1], lbl[0], record[0], record[1]), key


def parse_index(idx_path: Path, expected: int, tar_bytes: int) -> tuple[np.ndarray, list[str]]:
    """A DALI `.idx` file as int64 rows [N, 5] (see `_COLUMNS`) and sample keys; the one parser.

    UserError naming the file (and line) for anything that is not the index the writer writes for
    a tar of `tar_bytes` bytes holding `expected` samples.
    """
    try:
        lines = idx_path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{idx_path}: unreadable DALI index ({err})") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[0].startswith("v1.") or not head[1].isdigit():
        raise UserError(f"{idx_path}:1: not a DALI webdataset index (the first line must be 'v1.2 N')")
    body = lines[1:]
    if int(head[1]) != len(body) or len(body) != expected:
        raise UserError(
            f"{idx_path}: index lists {len(body)} samples, header says {head[1]}, "
            f"the manifest says {expected}"
        )
    rows = np.zeros((len(body), len(_COLUMNS)), dtype=np.int64)
    keys: list[str] = []
    for i, line in enumerate(body):
        row, key = _index_row(line.split(), f"{idx_path}:{i + 2}", tar_bytes)
        rows[i] = row
        keys.append(key)
    return rows, keys


def build_sample_table(manifest: Manifest, want_keys: bool = False) -> SampleTable:
    """Read every shard's `.idx` (a few seconds for millions of samples; no tar is opened). With
    `want_keys`, a sample key listed twice (which sample would a pair or a name mean?) is refused."""
    parts, shard_ids, keys = [], [], []
    paths = manifest.shard_paths()
    where_key: dict[str, Path] = {}
    for s, (info, idx) in enumerate(zip(manifest.shards, manifest.index_paths(), strict=True)):
        rows, k = parse_index(idx, info.samples, info.bytes)
        parts.append(rows)
        shard_ids.append(np.full(len(rows), s, dtype=np.int32))
        if want_keys:
            for key in k:
                if key in where_key:
                    first = where_key[key].name
                    raise UserError(f"{idx}: sample key {key} is listed twice (also in {first})")
                where_key[key] = idx
            keys.extend(k)
    rows = np.concatenate(parts) if parts else np.zeros((0, len(_COLUMNS)), dtype=np.int64)
    columns = {name: np.ascontiguousarray(rows[:, c]) for c, name in enumerate(_COLUMNS)}
    return SampleTable(
        shard_paths=paths,
        shard=np.concatenate(shard_ids) if shard_ids else np.zeros(0, dtype=np.int32),
        keys=keys if want_keys else None,
        num_classes=manifest.num_classes,
        **columns,
    )


def _header_ok(header: bytes) -> bool:
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    actual = sum(header[:148]) + 8 * 32 + sum(header[156:])  # the checksum field counts as spaces
    name = header[:100].split(b"\0", 1)[0]
    return stored == actual and (name.endswith(b".jpg") or len(name) == 99)  # GNU long names: 99 chars


# The writer's `crc32` field as it stands in the compact, key-sorted record (shards/writer.py). A
# search for it costs a tenth of parsing the record, which matters at thousands of samples/s.
_CRC_PATTERN = re.compile(
    rb'"%s":\{"%s":(\d+),"%s":(\d+)\}' % (CRC_FIELD.encode(), *(m.encode() for m in CRC_MEMBERS))
)


def _check_crcs(record_bytes: bytes, members: dict[str, bytes], where: str) -> None:
    """Compare the members with the CRC32s in the sample's JSON record (no field: an older shard)."""
    found = _CRC_PATTERN.search(record_bytes)
    if found is None:
        if b'"%s"' % CRC_FIELD.encode() in record_bytes:
            raise UserError(f"{where}: corrupt sample record (unreadable {CRC_FIELD} field)")
        return
    for ext, stored in zip(CRC_MEMBERS, found.groups(), strict=True):
        if zlib.crc32(members[ext]) != int(stored):
            raise UserError(f"{where}: the {ext} member does not match its CRC32 (corrupt shard)")


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
        """(JPEG bytes, label) of sample i, checked: its tar header, the label's range and, when
        the record has one (every shard since the writer added it), the CRC32 of both members."""
        t = self.table
        shard = int(t.shard[i])
        start = int(t.jpg_offset[i]) - TAR_BLOCK  # from the JPEG's own tar header to the record's end
        end = int(t.json_offset[i]) + int(t.json_size[i])
        data = os.pread(self._fd(shard), end - start, start)
        where = f"{t.shard_paths[shard]}: sample {i}"
        if len(data) != end - start:
            raise UserError(f"{where} ends at byte {end}, the file has {start + len(data)} (truncated shard)")
        if not _header_ok(data[:TAR_BLOCK]):
            # the tar header just before the data must be intact and name a .jpg member: catches
            # overwritten bytes and an index that does not belong to this tar
            raise UserError(f"{where}: corrupt shard or stale index (bad tar header at byte {start})")
        jpg = data[TAR_BLOCK : TAR_BLOCK + int(t.jpg_size[i])]
        lbl_at = int(t.lbl_offset[i]) - start
        label_bytes = data[lbl_at : lbl_at + 4]
        if t.json_size[i]:
            _check_crcs(data[int(t.json_offset[i]) - start :], {"jpg": jpg, "lbl": label_bytes}, where)
        label = decode_label(label_bytes)
        if t.num_classes is not None and not 0 <= label < t.num_classes:
            raise UserError(f"{where}: label {label} is outside 0..{t.num_classes - 1} (corrupt shard)")
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


@dataclass(frozen=True)
class RankPlan:
    """One rank's batches of every epoch: which samples batch k holds and its seed words. Small and
    picklable, so reader processes (DALI's parallel source) work out their own tasks."""

    num_samples: int
    batch_size: int
    rank: int
    world_size: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.world_size)

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(
            self.num_samples,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=epoch,
        )

    def task(self, epoch: int, k: int, order: np.ndarray) -> Task:
        """Batch k of the epoch whose `order` is given (computing the order is the costly part)."""
        b = self.batch_size
        return (self.seed & 0xFFFFFFFF, int(epoch), self.rank, int(k)), order[k * b : (k + 1) * b]

    def tasks(self, epoch: int, start_batch: int = 0) -> list[Task]:
        order = self.order(epoch)
        return [self.task(epoch, k, order) for k in range(start_batch, self.batches_per_epoch)]
