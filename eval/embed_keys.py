"""Embedding only the faces a set's pairs use, read straight from their shard offsets.

The JPEGs are located through the DALI .idx files (eval/pairs.py `shard_jpegs`), read in shard
order and decoded one batch ahead in a thread (OpenCV releases the GIL) while the model runs the
current batch. Flip rule as eval/embed.py: the batch and its mirror image in one forward, the two
embeddings added, the sum L2-normalized.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from eval.embed import EmbedFn, onnx_embedder, progress_bar
from eval.pairs import Member
from shards.torch_pipeline import decode_into, to_model_input


def flip_embed(embed: EmbedFn, images: torch.Tensor, flip: bool = True) -> np.ndarray:
    """L2-normalized embeddings of a model-input batch, with the mirror image added when flip."""
    if flip:
        both = embed(torch.cat([images, torch.flip(images, dims=[3])]))
        emb = both[: len(images)] + both[len(images):]
    else:
        emb = embed(images)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb.astype(np.float32, copy=False)


def _decode_batch(members: list[Member], keys: list[str], size: tuple[int, int]) -> torch.Tensor:
    images = np.empty((len(keys), size[0], size[1], 3), dtype=np.uint8)
    handles: dict = {}
    try:
        for k, key in enumerate(keys):
            m = members[k]
            f = handles.get(m.shard) or handles.setdefault(m.shard, open(m.shard, "rb"))  # noqa: SIM115
            f.seek(m.offset)
            decode_into(images[k], f.read(m.size), f"{m.shard} (sample {key})")
    finally:
        for f in handles.values():
            f.close()
    return to_model_input(torch.from_numpy(images), torch.device("cpu"), False)


def _batches(where: dict[str, Member], keys: list[str], size: tuple[int, int],
             batch_size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    chunks = [keys[s:s + batch_size] for s in range(0, len(keys), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(_decode_batch, [where[k] for k in c], c, size) for c in chunks[:2]]
        for i, chunk in enumerate(chunks):
            images = pending[i].result()
            if i + 2 < len(chunks):
                nxt = chunks[i + 2]
                pending.append(pool.submit(_decode_batch, [where[k] for k in nxt], nxt, size))
            pending[i] = None  # type: ignore[call-overload]  # free the batch once handed out
            yield chunk, images


def embed_keys(embed: EmbedFn, where: dict[str, Member], keys: Iterable[str], image_size: tuple[int, int],
               *, batch_size: int = 32, flip: bool = True, parallel: int = 1, show_progress: bool = True,
               label: str = "embedding") -> tuple[np.ndarray, dict[str, int]]:
    """(L2-normalized embeddings [N, D], key -> row) for each distinct key, read in shard order.

    parallel > 1 runs that many batches through `embed` at once from threads: for a model that
    releases the GIL and uses one thread itself (onnxruntime with one intra-op thread), which on a
    busy small CPU beats one model spreading each small batch over the cores (bench/verify.py).
    """
    order = sorted(set(keys), key=lambda k: (str(where[k].shard), where[k].offset))
    feats: list[np.ndarray] = []
    start = time.perf_counter()
    done = 0
    batches = _batches(where, order, tuple(image_size), batch_size)  # type: ignore[arg-type]
    with progress_bar() as bar, ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
        task = bar.add_task(label, total=len(order), rate="-", visible=show_progress)
        running: deque = deque()  # (faces, future) in batch order

        def collect() -> None:
            nonlocal done
            n, fut = running.popleft()
            feats.append(fut.result())
            done += n
            bar.update(task, completed=done, rate=f"{done / max(time.perf_counter() - start, 1e-9):.0f}")

        for chunk, images in batches:
            running.append((len(chunk), pool.submit(flip_embed, embed, images, flip)))
            while len(running) >= max(parallel, 1):
                collect()
        while running:
            collect()
    index_of = {k: i for i, k in enumerate(order)}
    return (np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)), index_of


def onnx_cpu_embedder(path: Path, image_size: tuple[int, int], threads: int = 1) -> EmbedFn:
    """eval/embed.py's onnx_embedder (its checks run first, on the same file) with `threads` intra-op
    threads. Temporary: eval/embed.py's session takes onnxruntime's default thread pool and no
    options; this goes once it takes a thread count.
    """
    import onnxruntime as ort

    check = onnx_embedder(path, image_size, torch.device("cpu"))  # validates the file and its input
    del check
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(images: torch.Tensor) -> np.ndarray:
        return np.asarray(sess.run(None, {name: images.numpy().astype(np.float32, copy=False)})[0])

    return run
