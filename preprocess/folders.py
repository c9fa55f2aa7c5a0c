"""A folder per identity (`ROOT/<identity>/*.jpg|jpeg|png`): CASIA-WebFace and most private collections.

Every image directly inside an identity folder is an input; other files (and hidden ones, and
deeper folders) are not, and are counted in the log. The tree is walked by common/walk.py: only
regular files are read, links are followed but not in a loop, and an image-like name that cannot
be read (a FIFO, a broken link, a name that is not UTF-8) is a reject with its reason. An identity
folder without images gives no class. Faces come aligned (`--aligned`), with landmarks from a file
in the LFW format (`<identity>/<file><TAB>x1 y1 ... x5 y5`, relative to ROOT), or from the
detector (`--detect`).
"""

from __future__ import annotations

from pathlib import Path

from common.cli import UserError
from common.walk import regular_files
from preprocess.datasets import IMAGE_EXTENSIONS, DatasetInputs, Entry, entries_for, read_lfw_landmarks


def walk(root: Path) -> tuple[list[str], list[str], list[Entry], int]:
    """(relative image paths, identity folders without images, rejects, other files skipped).

    An image-like name that cannot be read (a FIFO, a link that loops or leads nowhere, a name that
    is not UTF-8) is a reject with its reason; so is an identity folder whose name is not UTF-8.
    """
    tree = regular_files(root, depth=2, hidden=False)
    images = [rel for rel in tree.files if rel.count("/") == 1 and rel.lower().endswith(IMAGE_EXTENSIONS)]
    with_images = {rel.split("/", 1)[0] for rel in images}
    empty = [folder for folder in tree.folders if folder not in with_images]
    rejects = [
        Entry(s.rel, s.rel.split("/", 1)[0], reason=s.reason, detail=s.detail)
        for s in tree.skipped
        if s.reason not in ("hidden", "too_deep")
        and (s.rel.lower().endswith(IMAGE_EXTENSIONS) or s.reason == "name_not_utf8")
    ]
    skipped = len(tree.files) - len(images) + len(tree.skipped) - len(rejects)
    return images, empty, rejects, skipped


def read_folders(root: Path, landmarks: Path | None = None) -> DatasetInputs:
    """The inputs under ROOT; with `landmarks`, each image's row from that file (else none needed)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: --root is not a folder")
    images, empty, rejects, skipped = walk(root)
    if not images:
        raise UserError(f"{root}: no images in <identity>/ folders (expected ROOT/<identity>/*.jpg|png)")
    if landmarks is not None:
        if not landmarks.is_file():
            raise UserError(f"{landmarks}: landmark file not found")
        entries = entries_for(set(images), set(images), read_lfw_landmarks(landmarks))
    else:
        entries = [Entry(rel, rel.split("/", 1)[0]) for rel in images]
    entries += rejects
    files = {
        "images": f"{root} ({len(images)} images, {len(empty)} identity folders without any, "
        f"{len(rejects)} unreadable, {skipped} other files skipped)",
        "landmarks": str(landmarks or "(none)"),
    }
    return DatasetInputs("folders", "train", root, entries, files=files)
