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
# What each entry must be: (dtype kinds, number of dimensions). "U": text, "i"/"u": integers, "f": floats.
_ENTRY_TYPES = {
    "format": ("U", 0),
    "version": ("iu", 0),
    "names": ("U", 1),
    "templates": ("f", 2),
    "embeddings": ("f", 2),
    "photo_person": ("iu", 1),
    "photo_paths": ("U", 1),
    "root": ("U", 0),
    "model_architecture": ("U", 0),
    "model_fingerprint": ("U", 0),
    "image_size": ("iu", 1),
    "skipped_paths": ("U", 1),
    "skipped_reasons": ("U", 1),
}
_OPTIONAL_TYPES = {"face_policy": ("U", 0)}  # absent from galleries enrolled before it was recorded


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
    arrays = _read_arrays(path)
    templates, embeddings, person = arrays["templates"], arrays["embeddings"], arrays["photo_person"]
    policy = str(arrays["face_policy"]) if "face_policy" in arrays else None
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


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The gallery's entries, each of the type and rank it must have, in a gallery of this version;
    UserError naming the file and what is wrong with it (another kind of file, damage, another
    version, an entry of the wrong type)."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:2] != b"PK":  # an .npz is a zip archive
        kind = (
            "a single NumPy array (.npy)"
            if head == b"\x93NUMPY"
            else "a Python pickle (not read: loading it could run code)"
            if head[:1] == b"\x80"
            else "not a NumPy .npz archive"
        )
        raise UserError(f"{path}: {kind}; a gallery is the .npz that identify.py enrol writes")
    key = None
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in _ENTRY_TYPES if k not in data.files]
            if missing:
                raise UserError(f"{path}: not a {FORMAT} file (missing {', '.join(missing)})")
            arrays = {}
            for key in [*_ENTRY_TYPES, *(k for k in _OPTIONAL_TYPES if k in data.files)]:
                arrays[key] = data[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        where = f"entry {key!r}" if key else "the archive"
        if "Object arrays" in str(err):  # numpy's refusal under allow_pickle=False
            raise UserError(
                f"{path}: {where} holds Python objects (not read: loading them could run code)"
            ) from None
        raise UserError(
            f"{path}: {where} cannot be read, damaged or truncated? ({type(err).__name__}: {err})"
        ) from None
    if arrays["format"].shape != () or str(arrays["format"]) != FORMAT:
        raise UserError(f"{path}: not a {FORMAT} file (format {arrays['format'].tolist()!r})")
    version = arrays["version"]
    if version.dtype.kind not in "iu" or version.shape != ():
        raise UserError(f"{path}: version {version.tolist()!r} is not a whole number")
    if int(version) != VERSION:
        newer = "a newer facetrain wrote it" if int(version) > VERSION else "enrol again"
        raise UserError(f"{path}: gallery version {int(version)}, this facetrain reads {VERSION} ({newer})")
    for key, (kinds, ndim) in {**_ENTRY_TYPES, **_OPTIONAL_TYPES}.items():
        value = arrays.get(key)
        if value is None:
            continue
        if value.dtype.kind not in kinds or value.ndim != ndim:
            what = {"U": "text", "iu": "whole numbers", "f": "floating-point numbers"}[kinds]
            found = f"a {value.ndim}-d {value.dtype} array"
            raise UserError(f"{path}: entry {key!r} is {found}, a gallery's is {ndim}-d {what}")
    names, templates, embeddings = arrays["names"], arrays["templates"], arrays["embeddings"]
    person, photos = arrays["photo_person"], len(arrays["photo_paths"])
    inside = person[(person >= 0) & (person < len(names))].astype(np.int64)
    problems = [
        (not len(names), "no people"),
        (
            templates.shape != (len(names), embeddings.shape[1]),
            f"templates {templates.shape} for {len(names)} names",
        ),
        (len(embeddings) != photos, f"{len(embeddings)} embeddings for {photos} photo_paths"),
        (len(person) != photos, f"{len(person)} photo_person entries for {photos} photo_paths"),
        (len(inside) != len(person), f"photo_person outside 0..{len(names) - 1}"),
        ((np.bincount(inside, minlength=len(names)) == 0).any(), "a person without photos"),
        (
            len(arrays["skipped_paths"]) != len(arrays["skipped_reasons"]),
            "skipped_paths and skipped_reasons differ",
        ),
        (arrays["image_size"].shape != (2,) or (arrays["image_size"] < 1).any(), "image_size is not (H, W)"),
    ]
    problem = next((text for bad, text in problems if bad), None)
    if problem:
        raise UserError(f"{path}: inconsistent gallery arrays: {problem}")
    return arrays


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
