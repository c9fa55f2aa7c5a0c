"""A folder per identity (`ROOT/<identity>/*.jpg|jpeg|png`): CASIA-WebFace and most private collections.

Every image directly inside an identity folder is an input; other files (and hidden ones, and
deeper folders) are not, and are counted in the log. An identity folder without images gives no
class. Faces come aligned (`--aligned`), with landmarks from a file in the LFW format
(`<identity>/<file><TAB>x1 y1 ... x5 y5`, relative to ROOT), or from the detector (`--detect`).
"""

from __future__ import annotations

import os
from pathlib import Path

from common.cli import UserError
from preprocess.datasets import IMAGE_EXTENSIONS, DatasetInputs, Entry, entries_for, read_lfw_landmarks


def walk(root: Path) -> tuple[list[str], list[str], int]:
    """(relative image paths, identity folders without images, other files skipped)."""
    images, empty, skipped = [], [], 0
    with os.scandir(root) as top:
        folders = sorted((d for d in top if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    for folder in folders:
        found = 0
        with os.scandir(folder.path) as files:
            for f in files:
                if f.name.lower().endswith(IMAGE_EXTENSIONS) and not f.name.startswith(".") and f.is_file():
                    images.append(f"{folder.name}/{f.name}")
                    found += 1
                else:
                    skipped += 1
        if not found:
            empty.append(folder.name)
    return sorted(images), empty, skipped


def read_folders(root: Path, landmarks: Path | None = None) -> DatasetInputs:
    """The inputs under ROOT; with `landmarks`, each image's row from that file (else none needed)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: --root is not a folder")
    images, empty, skipped = walk(root)
    if not images:
        raise UserError(f"{root}: no images in <identity>/ folders (expected ROOT/<identity>/*.jpg|png)")
    if landmarks is not None:
        if not landmarks.is_file():
            raise UserError(f"{landmarks}: landmark file not found")
        entries = entries_for(set(images), set(images), read_lfw_landmarks(landmarks))
    else:
        entries = [Entry(rel, rel.split("/", 1)[0]) for rel in images]
    files = {
        "images": f"{root} ({len(images)} images, {len(empty)} identity folders without any, "
        f"{skipped} other files skipped)",
        "landmarks": str(landmarks or "(none)"),
    }
    return DatasetInputs("folders", "train", root, entries, files=files)
