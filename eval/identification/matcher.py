"""Who the found faces are: embed them, search the gallery's templates, name the best person.

`Matcher.label` takes any number of faces: one embedding batch (with the mirror images) and one
search (a matrix product against the templates) for all of them. `label_photos` gathers the faces of
consecutive photos into such batches, so that photos with one face each are embedded 32 at a time
rather than one by one, and hands the photos back in their order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.identification.faces import FaceModel, FoundFace, embed_crops
from eval.identification.gallery import Gallery, TemplateIndex

BATCH_FACES = 32  # faces embedded together (64 images with their mirrors): the runtimes' fast batch size


@dataclass
class Matcher:
    gallery: Gallery
    model: FaceModel
    index: TemplateIndex
    threshold: float
    top_k: int
    flip: bool
    # Each person's enrolled photos: photo indices sorted by person, and where each person's start.
    _by_person: np.ndarray = field(init=False, repr=False)
    _starts: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_person = np.argsort(self.gallery.photo_person, kind="stable")
        people = np.arange(len(self.gallery.names) + 1)
        self._starts = np.searchsorted(self.gallery.photo_person[self._by_person], people)

    def label(self, faces: list[FoundFace]) -> list[dict]:
        """For each face: identity (or "unknown"), the nearest person, score, top-k, and the best
        gallery photo of the nearest person."""
        if not faces:
            return []
        queries = embed_crops(self.model.embed, [f.crop for f in faces], flip=self.flip)
        idx, scores = self.index.search(queries, self.top_k)
        names = self.gallery.names
        results = []
        for q, row, row_scores in zip(queries, idx, scores):
            best, score = int(row[0]), float(row_scores[0])
            results.append(
                {
                    "identity": names[best] if score >= self.threshold else "unknown",
                    "nearest": names[best],
                    "score": round(score, 4),
                    "photo": self._best_photo(best, q),
                    "top": [[names[int(i)], round(float(s), 4)] for i, s in zip(row, row_scores)],
                }
            )
        return results

    def _best_photo(self, person: int, query: np.ndarray) -> int:
        photos = self._by_person[self._starts[person] : self._starts[person + 1]]
        return int(photos[np.argmax(self.gallery.embeddings[photos] @ query)])


def label_photos(
    found: Iterable[tuple[Path, list[FoundFace] | None]], matcher: Matcher, batch: int = BATCH_FACES
) -> Iterator[tuple[Path, list[FoundFace] | None, list[dict]]]:
    """(path, faces or None when unreadable, their labels) for each photo of `found`, in order; the
    faces of consecutive photos are labelled together, `batch` or more at a time."""
    waiting: list[tuple[Path, list[FoundFace] | None]] = []
    count = 0
    for path, faces in found:
        waiting.append((path, faces))
        count += len(faces or ())
        if count >= batch:
            yield from _labelled(waiting, matcher)
            waiting, count = [], 0
    yield from _labelled(waiting, matcher)


def _labelled(
    photos: list[tuple[Path, list[FoundFace] | None]], matcher: Matcher
) -> Iterator[tuple[Path, list[FoundFace] | None, list[dict]]]:
    labels = iter(matcher.label([face for _, faces in photos for face in faces or ()]))
    for path, faces in photos:
        yield path, faces, [next(labels) for _ in faces or ()]
