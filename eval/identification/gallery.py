"""A gallery of enrolled people (GALLERY.npz) and the search over it.

The file is a NumPy .npz of plain arrays only (read with allow_pickle=False, so it never runs
code): `format`, `version`, `names` (P,), `templates` (P, D) float32 (each person's mean embedding,
L2-normalized), `embeddings` (N, D) float32 (every enrolled photo), `photo_person` (N,) int32,
`photo_paths` (N,) (relative to `root`), `root`, `model_architecture`, `model_fingerprint`,
`image_size` (2,) int32, `skipped_paths` / `skipped_reasons` (photos not used, and why), and
`face_policy` (which face of a photo with several was enrolled: preprocess/face_choice.py's policy
name; galleries written before it was recorded load without it, as "not recorded").

Search is one matrix product of the L2-normalized queries with the templates (cosine similarity),
then a partial sort for the top k; with `faiss-cpu` installed, `TemplateIndex(backend="faiss")` runs
an exact inner-product FAISS index instead (same results, same call). numpy is the default: on the
2-core development machine it searched a 1M x 512 gallery 1.6-2.2x faster than FAISS's flat index
(bench/identify.py speed).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.cli import UserError
from common.fileio import atomic_write_bytes
from eval.verification.metrics import NonFiniteEmbeddings, check_finite

FORMAT, VERSION = "facetrain-gallery", 1
_KEYS = (
    "format",
    "version",
    "names",
    "templates",
    "embeddings",
    "photo_person",
    "photo_paths",
    "root",
    "model_architecture",
    "model_fingerprint",
    "image_size",
    "skipped_paths",
    "skipped_reasons",
)


@dataclass(frozen=True)
class ModelInfo:
    architecture: str  # e.g. "mobilefacenet/128": backbone and embedding size
    fingerprint: str  # sha256 of the weights (checkpoint tensors or the ONNX file)
    image_size: tuple[int, int]  # (H, W) of the aligned faces it takes


@dataclass
class Gallery:
    names: list[str]
    templates: np.ndarray
    embeddings: np.ndarray
    photo_person: np.ndarray
    photo_paths: list[str]
    root: str
    model: ModelInfo
    skipped: list[tuple[str, str]] = field(default_factory=list)
    face_policy: str | None = None  # None: enrolled before the policy was recorded

    @property
    def face_policy_text(self) -> str:
        return self.face_policy or "not recorded"

    def photo_path(self, i: int) -> Path:
        return Path(self.root) / self.photo_paths[i]


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def person_templates(embeddings: np.ndarray, photo_person: np.ndarray, num_people: int) -> np.ndarray:
    """(P, D): each person's photos' mean embedding, L2-normalized."""
    sums = np.zeros((num_people, embeddings.shape[1]), dtype=np.float64)
    np.add.at(sums, photo_person, embeddings)
    return normalize(sums)


def save_gallery(path: Path, gallery: Gallery) -> Path:
    arrays = {
        "format": np.array(FORMAT),
        "version": np.array(VERSION, dtype=np.int32),
        "names": np.array(gallery.names, dtype=str),
        "templates": gallery.templates.astype(np.float32),
        "embeddings": gallery.embeddings.astype(np.float32),
        "photo_person": gallery.photo_person.astype(np.int32),
        "photo_paths": np.array(gallery.photo_paths, dtype=str),
        "root": np.array(gallery.root),
        "model_architecture": np.array(gallery.model.architecture),
        "model_fingerprint": np.array(gallery.model.fingerprint),
        "image_size": np.array(gallery.model.image_size, dtype=np.int32),
        "skipped_paths": np.array([p for p, _ in gallery.skipped], dtype=str),
        "skipped_reasons": np.array([r for _, r in gallery.skipped], dtype=str),
    }
    if gallery.face_policy is not None:
        arrays["face_policy"] = np.array(gallery.face_policy)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue(), what="gallery")


def load_gallery(path: Path) -> Gallery:
    """The gallery in `path`; UserError naming the file when it is missing or not a gallery."""
    if not path.is_file():
        raise UserError(f"{path}: gallery file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in _KEYS if k not in data.files]
            if missing or str(data["format"]) != FORMAT:
                raise UserError(f"{path}: not a {FORMAT} file (missing {', '.join(missing) or 'format'})")
            arrays = {k: data[k] for k in _KEYS}
            policy = str(data["face_policy"]) if "face_policy" in data.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"{path}: not a readable gallery file ({type(err).__name__})") from None
    if int(arrays["version"]) != VERSION:
        raise UserError(f"{path}: gallery version {int(arrays['version'])}, this tool reads {VERSION}")
    templates, embeddings = arrays["templates"], arrays["embeddings"]
    person = arrays["photo_person"]
    if (
        templates.ndim != 2
        or embeddings.ndim != 2
        or templates.shape[1] != embeddings.shape[1]
        or len(arrays["names"]) != len(templates)
        or len(person) != len(embeddings)
        or (len(person) and (person.min() < 0 or person.max() >= len(templates)))
    ):
        raise UserError(f"{path}: inconsistent gallery arrays (names, templates, embeddings, photo_person)")
    try:  # a gallery enrolled before enrol refused NaN: every search on it would say "unknown"
        check_finite(templates, {name: row for row, name in enumerate(arrays["names"].tolist())})
    except NonFiniteEmbeddings as err:
        raise UserError(f"{path}: templates: {err}; enrol again with a working model") from None
    size = tuple(int(v) for v in arrays["image_size"])
    model = ModelInfo(str(arrays["model_architecture"]), str(arrays["model_fingerprint"]), size)  # type: ignore[arg-type]
    skipped = list(zip(arrays["skipped_paths"].tolist(), arrays["skipped_reasons"].tolist()))
    return Gallery(
        arrays["names"].tolist(),
        templates.astype(np.float32),
        embeddings.astype(np.float32),
        person.astype(np.int64),
        arrays["photo_paths"].tolist(),
        str(arrays["root"]),
        model,
        skipped,
        policy,
    )


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class TemplateIndex:
    """Top-k cosine search over L2-normalized templates: one matrix product (numpy) or FAISS.

    backend: "numpy" or "faiss" (exact IndexFlatIP; needs faiss-cpu).
    """

    def __init__(self, templates: np.ndarray, backend: str = "numpy", chunk: int | None = None) -> None:
        if backend not in ("numpy", "faiss"):
            raise ValueError(f"backend must be numpy or faiss, got {backend!r}")
        if backend == "faiss" and not faiss_available():
            raise UserError("--index faiss: faiss is not installed (pip install faiss-cpu)")
        self.backend = backend
        self.templates = np.ascontiguousarray(templates, dtype=np.float32)
        # Queries per product: the (chunk x P) float32 score matrix stays under 256 MB.
        self.chunk = chunk or max(1, min(1024, (1 << 26) // max(len(self.templates), 1)))
        self._faiss = None
        if backend == "faiss":
            import faiss

            self._faiss = faiss.IndexFlatIP(self.templates.shape[1])
            self._faiss.add(self.templates)

    def __len__(self) -> int:
        return len(self.templates)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices (Q, k), scores (Q, k)), best first; queries (Q, D) L2-normalized."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, len(self))
        if self._faiss is not None:
            scores, idx = self._faiss.search(queries, k)
            return idx.astype(np.int64), scores
        out_idx = np.empty((len(queries), k), dtype=np.int64)
        out_scores = np.empty((len(queries), k), dtype=np.float32)
        for start in range(0, len(queries), self.chunk):
            scores = queries[start : start + self.chunk] @ self.templates.T
            n = scores.shape[1]  # the k largest, without negating (copying) the score matrix
            top = (
                np.argpartition(scores, n - k, axis=1)[:, n - k :]
                if k < n
                else np.broadcast_to(np.arange(n), scores.shape)
            )
            top_scores = np.take_along_axis(scores, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            out_idx[start : start + self.chunk] = np.take_along_axis(top, order, axis=1)
            out_scores[start : start + self.chunk] = np.take_along_axis(top_scores, order, axis=1)
        return out_idx, out_scores


# ---------------------------------------------------------------------- identification figures


def rank_k_accuracy(top_idx: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of genuine queries whose person is among their first k results."""
    return float((top_idx[:, :k] == truth[:, None]).any(axis=1).mean())


def open_set_rate(
    genuine_top1: np.ndarray, genuine_correct: np.ndarray, impostor_top1: np.ndarray, far: float
) -> tuple[float, float]:
    """(detection-and-identification rate, threshold) at a false-accept rate `far`.

    The threshold is the lowest score that accepts at most `far` of the impostors (queries of
    people not in the gallery) by their best score; a genuine query counts when its best match
    is its own person and scores above that threshold.
    """
    imp = np.sort(np.asarray(impostor_top1, dtype=np.float64))[::-1]
    allowed = int(np.floor(far * len(imp)))
    threshold = float(imp[allowed]) if allowed < len(imp) else float(imp[-1]) - 1e-6
    accepted = np.asarray(genuine_top1) > threshold
    return float((accepted & np.asarray(genuine_correct, dtype=bool)).mean()), threshold
