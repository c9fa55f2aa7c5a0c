"""Photos to embeddings for identification: read, detect, align, embed (with flip).

Also loads the embedding model (checkpoint, ONNX or OpenVINO, through models/load.py) with what a gallery must
record about it: its architecture, image size and a fingerprint of its weights, and the verification
threshold its LFW evaluation chose when the checkpoint carries one. Crops are embedded with
eval/embed.py's flip rule.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from common.cli import UserError, log
from eval.embed import flip_embed
from eval.identification.gallery import ModelInfo
from models.load import EmbedFn, load_model
from models.model_file import as_threshold
from preprocess.align import check_landmarks, warp
from preprocess.detect import DEFAULT_MIN_SIZE, Face, default_detector, detect_faces

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass
class FaceModel:
    info: ModelInfo
    embed: EmbedFn
    threshold: float | None  # the LFW evaluation's threshold, when the checkpoint carries one
    where: str


@dataclass
class FoundFace:
    face: Face
    crop: np.ndarray  # aligned RGB uint8 (H, W, 3)


def load_face_model(
    path: Path, device_name: str = "cpu", runtime: str = "auto", threads: int | None = None
) -> FaceModel:
    """A checkpoint (.pt), an ONNX or an OpenVINO model (models/load.py), with its ModelInfo;
    UserError naming the file. threads: the CPU threads one embedding call may use (default: all
    cores), fewer when detection processes share the cores."""
    if threads is not None:
        torch.set_num_threads(threads)  # a checkpoint's; ONNX and OpenVINO take onnx_threads
    model = load_model(path, device_name, runtime=runtime, onnx_threads=threads)
    info = ModelInfo(model.architecture, model.fingerprint(), model.image_size)
    return FaceModel(info, model.embed, model.threshold, model.name)


def threshold_from_metrics(path: Path) -> float:
    """The `threshold` of an eval/lfw.py metrics JSON."""
    try:
        value = json.loads(path.read_text()).get("threshold")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"{path}: not a readable metrics JSON ({type(err).__name__})") from None
    threshold = as_threshold(value)
    if threshold is None:
        raise UserError(f"{path}: no numeric 'threshold' in [-1, 1] (an eval/lfw.py --json file?)")
    return threshold


def read_rgb(path: Path) -> np.ndarray | None:
    """The photo as RGB uint8, or None when it cannot be read or decoded."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    return None if image is None else np.ascontiguousarray(image[:, :, ::-1])


def find_faces(
    rgb: np.ndarray,
    image_size: tuple[int, int],
    source: object = "an image",
    min_face: float = DEFAULT_MIN_SIZE,
) -> list[FoundFace]:
    """Every detected face whose landmarks can be aligned, with its aligned crop; best score first.
    A face whose landmarks cannot (preprocess/align.py's check_landmarks) is left out with a warning
    naming `source` (the photo, or the video and frame). min_face: the smallest face side looked
    for, in pixels (larger is faster)."""
    found = []
    for face in detect_faces(rgb, min_size=min_face):
        bad = check_landmarks(face.landmarks, image_size, (rgb.shape[1], rgb.shape[0]))
        if bad is None:
            found.append(FoundFace(face, warp(rgb, face.landmarks, image_size)))
        else:
            box = ",".join(str(round(float(v))) for v in face.box)
            log(f"warning: {source}: the face at x,y,w,h {box} is left out: {bad[0]} ({bad[1]})")
    return found


def embed_crops(embed: EmbedFn, crops: list[np.ndarray], flip: bool = True, batch: int = 64) -> np.ndarray:
    """(N, D) L2-normalized embeddings of aligned RGB uint8 crops; with flip, of the crop plus its mirror."""
    out = []
    for start in range(0, len(crops), batch):
        x = torch.from_numpy(np.stack(crops[start : start + batch])).permute(0, 3, 1, 2).float()
        out.append(flip_embed(embed, (x / 255.0 - 0.5) / 0.5, flip))
    return np.concatenate(out) if out else np.empty((0, 0), dtype=np.float32)


# ------------------------------------------------------------------ many photos, in parallel

IN_FLIGHT_PER_WORKER = 16  # photos queued per detection process: enough to ride out a batch embedding


_worker_sizes: tuple[tuple[int, int], float] = ((112, 112), DEFAULT_MIN_SIZE)  # a detection process's


def _init_worker(image_size: tuple[int, int], min_face: float) -> None:
    global _worker_sizes
    _worker_sizes = image_size, min_face
    torch.set_num_threads(1)  # one thread per process: the detector's rule (preprocess/detect.py)
    cv2.setNumThreads(1)
    default_detector()  # built now, while the parent loads its model


def _analyse(
    path: Path, sizes: tuple[tuple[int, int], float] | None = None
) -> tuple[Path, list[FoundFace] | None]:
    rgb = read_rgb(path)
    image_size, min_face = sizes or _worker_sizes
    return path, None if rgb is None else find_faces(rgb, image_size, path, min_face)


class PhotoAnalyser:
    """Reads, detects and aligns photos: in `workers` processes, started at once so that their
    start-up overlaps the caller's (one detector thread each), or in this process with workers=0.
    A context manager; `analyse` may be called more than once. min_face: as find_faces."""

    def __init__(
        self, image_size: tuple[int, int], workers: int = 0, min_face: float = DEFAULT_MIN_SIZE
    ) -> None:
        self.sizes, self.workers = (image_size, min_face), max(workers, 0)
        self._pool = None
        if self.workers:
            ctx = multiprocessing.get_context("spawn")  # no fork of a parent that holds torch threads
            self._pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=self.sizes)

    def analyse(self, paths: Iterable[Path]) -> Iterator[tuple[Path, list[FoundFace] | None]]:
        """(path, faces or None when unreadable) for each photo, in order. With workers, at most
        IN_FLIGHT_PER_WORKER photos per process are queued or done but not yet taken, so a slower
        consumer holds a bounded number of results."""
        if self._pool is None:
            yield from (_analyse(path, self.sizes) for path in paths)
            return
        todo = iter(paths)
        pending = deque(
            self._pool.apply_async(_analyse, (path,))
            for path in itertools.islice(todo, self.workers * IN_FLIGHT_PER_WORKER)
        )
        while pending:
            result = pending.popleft().get()
            pending.extend(self._pool.apply_async(_analyse, (path,)) for path in itertools.islice(todo, 1))
            yield result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> PhotoAnalyser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def analyse_photos(
    paths: list[Path], image_size: tuple[int, int], workers: int = 0
) -> Iterator[tuple[Path, list[FoundFace] | None]]:
    """(path, faces or None when unreadable) for each photo, in order; workers > 0: that many
    processes (detection dominates the time and runs in one thread per process)."""
    with PhotoAnalyser(image_size, workers if len(paths) > 1 else 0) as analyser:
        yield from analyser.analyse(paths)
