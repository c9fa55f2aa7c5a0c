"""Embedding only the faces a set's pairs use, through the shards' own reader.

The faces are picked by row from the sample table (the DALI .idx files) and read by
`shards.torch_pipeline.BatchDecoder` (every read checked: tar header, label range, CRC32), in shard
order, in one thread that decodes two batches ahead and makes each the model's input with its
mirror images (eval/embed.py's `flip_input`: numpy, no torch threads; pread, OpenCV and numpy
release the GIL), while `parallel` threads run the model on the batches already made.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from common.cli import UserError, progress
from eval.embed import EmbedFn, flip_input, flip_output
from shards.manifest import Manifest
from shards.sample_index import SampleTable
from shards.torch_pipeline import BatchDecoder


def _decode(decoder: BatchDecoder, rows: np.ndarray, flip: bool) -> torch.Tensor:
    """The model input of these faces (with their mirror images after them when flip)."""
    item = decoder[((0,), rows)]
    if isinstance(item, str):  # the decoder's one-line error
        raise UserError(item)
    return flip_input(item[0].numpy(), flip)


def _batches(decoder: BatchDecoder, rows: np.ndarray, batch_size: int, flip: bool) -> Iterator[torch.Tensor]:
    chunks = [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = deque(pool.submit(_decode, decoder, c, flip) for c in chunks[:2])
        for c in chunks[2:]:
            images = pending.popleft().result()
            pending.append(pool.submit(_decode, decoder, c, flip))
            yield images
        while pending:
            yield pending.popleft().result()


def _embed(embed: EmbedFn, images: torch.Tensor, n: int, flip: bool) -> np.ndarray:
    return flip_output(embed(images), n, flip)


class _NoBar:
    """Stands in for the progress bar when it is off (rich would still print an empty line)."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: object, **kwargs: object) -> int:
        return 0

    def update(self, *args: object, **kwargs: object) -> None:
        return None


def embed_keys(
    embed: EmbedFn,
    manifest: Manifest,
    table: SampleTable,
    keys: Iterable[str],
    *,
    batch_size: int = 32,
    flip: bool = True,
    parallel: int = 1,
    show_progress: bool = True,
    label: str = "embedding",
) -> tuple[np.ndarray, dict[str, int]]:
    """(L2-normalized embeddings [N, D], key -> row) for each distinct key (all in `table`, built
    with keys), read in shard order.

    parallel > 1 runs that many batches through `embed` at once from threads: for a model that
    releases the GIL and uses one thread per call (OpenVINO with one stream per core, onnxruntime
    with one intra-op thread), which on a busy small CPU beats one model spreading each batch over
    the cores (bench/verify.py).
    """
    row_of = {k: i for i, k in enumerate(table.keys or [])}
    rows = np.array(sorted({row_of[k] for k in keys}), dtype=np.int64)
    order = [table.keys[i] for i in rows]  # type: ignore[index]
    decoder = BatchDecoder(table, tuple(manifest.image_size), None)  # type: ignore[arg-type]
    feats: list[np.ndarray] = []
    done = 0
    batches = _batches(decoder, rows, batch_size, flip)
    bar_cm = progress("[bold]{task.description}") if show_progress else _NoBar()
    with bar_cm as bar, ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
        task = bar.add_task(label, total=len(order), visible=show_progress)
        running: deque = deque()  # (faces, future) in batch order

        def collect() -> None:
            nonlocal done
            n, fut = running.popleft()
            feats.append(fut.result())
            done += n
            bar.update(task, completed=done)

        for images in batches:
            n = len(images) // 2 if flip else len(images)
            running.append((n, pool.submit(_embed, embed, images, n, flip)))
            while len(running) >= max(parallel, 1):
                collect()
        while running:
            collect()
    decoder.reader.close()
    index_of = {k: i for i, k in enumerate(order)}
    return (np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)), index_of
