"""Identification figures on real LFW, through the same steps as `eval/identify.py`.

Protocol: every person with at least two photos is enrolled with their first photo (sorted file
names); all their other photos are genuine probes; the photos of people with a single photo are
impostors (nobody in the gallery). Each photo's face is the one `pick_face` chooses (LFW centres
the named person); a photo without a detected face counts as a miss. Figures: rank-1 and rank-5
accuracy of the genuine probes, and the open-set detection-and-identification rate at a false-accept
rate of 1% and 0.1% of the impostors.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from common.cli import UserError
from eval.identification.faces import analyse_photos, embed_crops, load_face_model
from eval.identification.gallery import TemplateIndex, open_set_rate, rank_k_accuracy
from preprocess.face_choice import pick_face


def lfw_split(images: Path) -> tuple[list[tuple[int, Path]], list[tuple[int, Path]], list[Path], list[str]]:
    """(gallery (person, photo), genuine probes (person, photo), impostor photos, gallery names)."""
    if not images.is_dir():
        raise UserError(f"{images}: LFW image folder not found")
    gallery, probes, impostors, names = [], [], [], []
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
        photos = sorted(folder.glob("*.jpg"))
        if len(photos) == 1:
            impostors.append(photos[0])
        elif photos:
            gallery.append((len(names), photos[0]))
            probes += [(len(names), p) for p in photos[1:]]
            names.append(folder.name)
    return gallery, probes, impostors, names


def identification_figures(
    images: Path, model_path: Path, workers: int = 2, flip: bool = True, runtime: str = "auto"
) -> dict:
    start = time.perf_counter()
    gallery, probes, impostors, names = lfw_split(images)
    model = load_face_model(model_path, runtime=runtime)
    paths = [p for _, p in gallery] + [p for _, p in probes] + impostors
    crops: list[np.ndarray | None] = []
    for _, faces in analyse_photos(paths, model.info.image_size, workers):
        face = pick_face([f.face for f in faces], (150, 150)) if faces else None
        crops.append(None if face is None else next(f.crop for f in faces if f.face is face))
    found = [c is not None for c in crops]
    emb = np.zeros((len(paths), 1), dtype=np.float32)
    if any(found):
        got = embed_crops(model.embed, [c for c in crops if c is not None], flip=flip)
        emb = np.zeros((len(paths), got.shape[1]), dtype=np.float32)
        emb[np.flatnonzero(found)] = got
    n_gal, n_probe = len(gallery), len(probes)
    # A gallery photo without a face leaves its person's template at zero: never the best match.
    index = TemplateIndex(emb[:n_gal], backend="numpy")
    truth = np.array([person for person, _ in probes])
    idx, scores = index.search(emb[n_gal : n_gal + n_probe], 5)
    probe_found = np.array(found[n_gal : n_gal + n_probe])
    idx[~probe_found] = -1  # no face: a miss at every rank
    _, imp_scores = index.search(emb[n_gal + n_probe :], 1)
    correct = idx[:, 0] == truth
    figures = {
        "gallery_people": n_gal,
        "genuine_probes": n_probe,
        "impostor_probes": len(impostors),
        "faces_found": round(float(np.mean(found)), 5),
        "rank1": round(rank_k_accuracy(idx, truth, 1), 5),
        "rank5": round(rank_k_accuracy(idx, truth, 5), 5),
    }
    for far in (0.01, 0.001):
        rate, threshold = open_set_rate(
            np.where(probe_found, scores[:, 0], -np.inf), correct, imp_scores[:, 0], far
        )
        figures[f"dir_at_far_{far:g}"] = round(rate, 5)
        figures[f"threshold_at_far_{far:g}"] = round(threshold, 4)
    figures.update(flip=flip, model=model.where, seconds=round(time.perf_counter() - start, 1))
    return figures
