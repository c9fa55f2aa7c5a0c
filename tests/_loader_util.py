"""Small shard sets for the loader tests: patterned 112x112 JPEGs in shards of uneven sizes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from shards.format import FORMAT_NAME, FORMAT_VERSION, scaled_template
from shards.manifest import write_manifest
from shards.writer import ShardWriter


def face_like(i: int, size: int = 112) -> np.ndarray:
    """A smooth RGB pattern that differs per sample and is left-right asymmetric (so a flip shows)."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    for c in range(3):
        a, b, ph = rng.uniform(1, 4, 2).tolist() + [rng.uniform(0, 6)]
        img[..., c] = 128 + 90 * np.sin(a * xx * 3 + b * yy * 2 + ph) * (0.4 + xx)
    img[size // 4 : size // 2, 4 : size // 3] = rng.integers(0, 255, 3)  # a block on the left only
    return np.clip(img, 0, 255).astype(np.uint8)


def make_shards(
    root: Path,
    sizes: list[int],
    num_classes: int = 7,
    size: int = 112,
    not_jpeg: frozenset[int] = frozenset(),
) -> Path:
    """Shards `train-00000k.tar` with `sizes[k]` samples; sample i has label i % num_classes.

    Samples in `not_jpeg` hold bytes that are no image (written as such: their CRC32 fits).
    """
    root.mkdir(parents=True, exist_ok=True)
    infos, i = [], 0
    for s, count in enumerate(sizes):
        with ShardWriter(root / f"train-{s:06d}.tar") as w:
            for _ in range(count):
                rgb = face_like(i, size)
                ok, jpg = cv2.imencode(
                    ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
                )
                assert ok
                if i in not_jpeg:
                    jpg = np.frombuffer(b"this is not a JPEG " * 20, np.uint8)
                label = i % num_classes
                w.add(
                    f"id{label:03d}__img_{i:05d}",
                    jpg.tobytes(),
                    label,
                    {"identity": f"id{label:03d}", "label": label},
                )
                i += 1
            infos.append(w.close())
    write_manifest(
        root,
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dataset": "test",
            "split": "train",
            "num_samples": i,
            "num_classes": num_classes,
            "classes": [f"id{c:03d}" for c in range(num_classes)],
            "image_size": [size, size],
            "template": scaled_template((size, size)),
            "jpeg_quality": 95,
            "num_rejects": 0,
            "num_inputs": i,
            "shards": [x.__dict__ for x in infos],
            "seed": 0,
            "command": "tests/_loader_util.py",
            "created_by": "facetrain tests",
        },
    )
    return root
