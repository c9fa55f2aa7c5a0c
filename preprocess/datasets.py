"""Readers for VGGFace2 and LFW exactly as they ship: which images exist, their 5 landmarks, LFW pairs.

A reader never decodes an image. It returns one `Entry` per input (an image on disk, listed, or named
by the landmark file); an entry that cannot be used (file missing, landmark row missing or bad)
carries its reject reason instead of landmarks. A wrong or missing *file the user named* is a
UserError naming that file.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import UserError
from common.fileio import TEXT_ENCODING
from common.walk import regular_files
from preprocess.pairs_file import read_pairs
from shards.format import sample_key
from shards.manifest import Pair

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Entry:
    rel: str  # path relative to the image root, '/'-separated
    identity: str
    landmarks: tuple[float, ...] | None = None  # x1 y1 ... x5 y5
    reason: str | None = None  # set when the entry is rejected before any image is read
    detail: str | None = None
    bbox: tuple[float, float, float, float] | None = None  # VGGFace2's loose box (x, y, w, h), if shipped
    source: str | None = None  # the file to read, when not <image root>/<rel> (RecordIO: the .rec)
    span: tuple[tuple[int, int], ...] | None = None  # (offset, length) ranges of the image inside `source`

    @property
    def key(self) -> str:
        return sample_key(self.rel)


@dataclass
class DatasetInputs:
    name: str  # "vggface2" | "lfw"
    split: str
    image_root: Path
    entries: list[Entry]
    pairs: list[tuple[str, str, bool, int]] | None = None  # (rel a, rel b, same, fold)
    identity_names: dict[str, str] = field(default_factory=dict)  # VGGFace2 class id -> person's name
    files: dict[str, str] = field(default_factory=dict)  # what was read, for the log


def parse_landmarks(fields: list[str]) -> tuple[tuple[float, ...] | None, str | None, str | None]:
    """(landmarks, None, None) or (None, reason, detail) from the 10 number fields of a row."""
    if len(fields) == 10:  # the common, well-formed row: no per-field clean-up needed (once per input)
        try:
            values = tuple(map(float, fields))
        except ValueError:
            values = ()
        if values and all(map(math.isfinite, values)):
            return values, None, None
    fields = [f.strip() for f in fields if f.strip() != ""]
    if len(fields) < 10:
        return None, "landmarks_short", f"{len(fields)} numbers, expected 10"
    if len(fields) > 10:  # not 5 points: a shifted or merged row, which no prefix of would fix
        return None, "landmarks_long", f"{len(fields)} numbers, expected 10"
    try:
        values = tuple(float(f) for f in fields[:10])
    except ValueError:
        return None, "landmarks_not_numeric", "a landmark field is not a number"
    if not all(math.isfinite(v) for v in values):
        return None, "landmarks_nan", "a landmark is NaN or infinite"
    return values, None, None


def _walk_images(image_root: Path) -> list[str]:
    """Relative paths of every image under the root, two levels (<identity>/<file>): regular files
    only, with UTF-8 names (common/walk.py)."""
    tree = regular_files(image_root, depth=2)
    return [rel for rel in tree.files if rel.count("/") == 1 and rel.lower().endswith(IMAGE_EXTENSIONS)]


def _require_file(path: Path, what: str, option: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: {what} not found (point at it with {option})")
    return path


def _require_dir(path: Path, what: str, option: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{path}: {what} not found (point at it with {option})")
    return path


def entries_for(
    on_disk: set[str],
    inputs: set[str],
    landmarks: dict[str, list[str]],
    boxes: dict[str, tuple[float, float, float, float]] | None = None,
) -> list[Entry]:
    """One entry per input, sorted by path; missing images and bad landmark rows carry their reason."""
    boxes = boxes or {}
    entries = []
    for rel in sorted(inputs):
        identity = rel.split("/", 1)[0]
        if rel not in on_disk:
            entries.append(Entry(rel, identity, reason="image_missing", detail="not on disk"))
            continue
        row = landmarks.get(rel)
        if row is None:
            entries.append(Entry(rel, identity, reason="landmarks_missing", detail="no landmark row"))
            continue
        values, reason, detail = parse_landmarks(row)
        entries.append(Entry(rel, identity, values, reason, detail, boxes.get(rel)))
    return entries


def read_vggface2(
    root: Path,
    split: str,
    images: Path | None = None,
    image_list: Path | None = None,
    landmarks: Path | None = None,
    detect: bool = False,
) -> DatasetInputs:
    """VGGFace2: `<split>/<id>/<file>.jpg`, `<split>_list.txt` (else a directory walk) and
    `bb_landmark/loose_landmark_<split>.csv`; when they ship, `bb_landmark/loose_bb_<split>.csv` and
    `meta/identity_meta.csv` too. Alignment needs only the landmarks: the loose box and the person's
    name are carried into each sample's record, for reference.
    """
    root = Path(root)
    image_root = _require_dir(
        images or root / split, f"VGGFace2 image folder for split '{split}'", "--images"
    )
    lm_path = landmarks or root / "bb_landmark" / f"loose_landmark_{split}.csv"
    on_disk = set(_walk_images(image_root))
    if detect and landmarks is None and not lm_path.is_file():  # the detector finds the points
        lm_path, rows = "(none: --detect)", {}
    else:  # unparsed: bad rows become per-image rejects
        rows = _read_name_id_csv(_require_file(lm_path, "VGGFace2 landmark CSV", "--landmarks"), "landmark")
    if image_list is not None:
        _require_file(image_list, "image list", "--list")
    list_path = image_list or root / f"{split}_list.txt"
    if list_path.is_file():  # the list is the authority: listed images missing on disk are rejects
        inputs = set(_read_list(list_path))
    else:  # no list: every image on disk, and every landmark row whose image is absent
        list_path = None
        inputs = on_disk | set(rows)
    bb_path = root / "bb_landmark" / f"loose_bb_{split}.csv"
    meta_path = root / "meta" / "identity_meta.csv"
    boxes = _read_vggface2_boxes(bb_path) if bb_path.is_file() else {}
    names = _read_identity_names(meta_path) if meta_path.is_file() else {}
    entries = entries_for(on_disk, inputs, rows, boxes)
    return DatasetInputs(
        "vggface2",
        split,
        image_root,
        entries,
        identity_names=names,
        files={
            "images": str(image_root),
            "list": str(list_path or "(directory walk)"),
            "landmarks": str(lm_path),
            "boxes": str(bb_path) if boxes else "(none)",
            "identity_meta": str(meta_path) if names else "(none)",
        },
    )


def _read_vggface2_boxes(path: Path) -> dict[str, tuple[float, float, float, float]]:
    """relative path -> (x, y, w, h). Informational only: a row that does not parse is left out."""
    boxes: dict[str, tuple[float, float, float, float]] = {}
    for rel, fields in _read_name_id_csv(path, "box").items():
        try:
            x, y, w, h = (float(v) for v in fields[:4])
        except ValueError:
            continue
        if all(math.isfinite(v) for v in (x, y, w, h)):
            boxes[rel] = (x, y, w, h)
    return boxes


def _read_identity_names(path: Path) -> dict[str, str]:
    """VGGFace2's `Class_ID, Name, Sample_Num, Flag, Gender` -> {class id: name}."""
    try:
        with open(path, newline="", encoding=TEXT_ENCODING) as f:
            reader = csv.reader(f, skipinitialspace=True)
            header = [h.strip().lower() for h in next(reader, None) or []]
            if header[:2] != ["class_id", "name"]:
                raise UserError(f"{path}: not VGGFace2's identity_meta.csv (columns Class_ID, Name, ...)")
            return {row[0].strip(): row[1].strip() for row in reader if len(row) >= 2 and row[0].strip()}
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path}: unreadable identity_meta.csv ({err})") from None


def _read_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding=TEXT_ENCODING).splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable image list ({err})") from None
    return [line.strip().replace("\\", "/") for line in lines if line.strip()]


def _read_name_id_csv(path: Path, what: str) -> dict[str, list[str]]:
    """A VGGFace2 `NAME_ID,...` CSV (landmarks or boxes): relative image path -> the other fields."""
    rows: dict[str, list[str]] = {}
    try:
        with open(path, newline="", encoding=TEXT_ENCODING) as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or not header or header[0].strip().upper() != "NAME_ID":
                raise UserError(f"{path}: not a VGGFace2 {what} CSV (first column must be NAME_ID)")
            for row in reader:
                if row and row[0].strip():
                    name = row[0].strip().replace("\\", "/")
                    # NAME_ID is the relative path without its extension; VGGFace2 images are .jpg.
                    name = name if name.lower().endswith(IMAGE_EXTENSIONS) else name + ".jpg"
                    _add_row(rows, name, [v.strip() for v in row[1:]], path, reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path}: unreadable {what} CSV ({err})") from None
    return rows


def read_lfw(
    root: Path,
    images: Path | None = None,
    landmarks: Path | None = None,
    pairs: Path | None = None,
    detect: bool = False,
) -> DatasetInputs:
    """LFW: `lfw/<Name>/<Name>_<NNNN>.jpg`, the 5-point landmark file, `pairs.txt`.

    Landmarks default to `lfw_landmark_150.txt` (the 150x150 copy) when present, else `lfw_landmark.txt`.
    """
    root = Path(root)
    image_root = _require_dir(images or root / "lfw", "LFW image folder", "--images")
    if landmarks is None:
        for candidate in ("lfw_landmark_150.txt", "lfw_landmark.txt"):
            if (root / candidate).is_file():
                landmarks = root / candidate
                break
        else:
            if not detect:
                raise UserError(
                    f"{root}: no lfw_landmark_150.txt or lfw_landmark.txt (point at it with --landmarks)"
                )
    on_disk = set(_walk_images(image_root))
    if landmarks is None:  # --detect: the detector finds the points
        lm_path, rows = "(none: --detect)", {}
    else:
        lm_path = _require_file(landmarks, "LFW landmark file", "--landmarks")
        rows = read_lfw_landmarks(lm_path)
    entries = entries_for(on_disk, on_disk | set(rows), rows)
    pair_path = (
        pairs if pairs is not None else (root / "pairs.txt" if (root / "pairs.txt").is_file() else None)
    )
    pair_list = None
    if pair_path:
        pair_lines = read_pairs(_require_file(pair_path, "LFW pairs file", "--pairs"))
        pair_list = [(p.a, p.b, p.same, p.fold) for p in pair_lines]
    return DatasetInputs(
        "lfw",
        "test",
        image_root,
        entries,
        pair_list,
        files={"images": str(image_root), "landmarks": str(lm_path), "pairs": str(pair_path or "(none)")},
    )


def read_lfw_landmarks(path: Path) -> dict[str, list[str]]:
    """`relative/path.jpg<TAB>x1 y1 ... x5 y5` lines -> {path: number fields}."""
    rows: dict[str, list[str]] = {}
    try:
        with open(path, encoding=TEXT_ENCODING) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                name, _, rest = line.rstrip("\n").partition("\t")
                if not rest:  # no tab: whitespace-separated path and numbers
                    name, *fields = line.split()
                else:
                    fields = rest.split()
                _add_row(rows, name.strip().replace("\\", "/"), fields, path, number)
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable landmark file ({err})") from None
    if not rows:
        raise UserError(f"{path}: the landmark file is empty")
    return rows


def _add_row(rows: dict[str, list[str]], name: str, fields: list[str], path: Path, number: int) -> None:
    """A repeated row is fine when it says the same; two different rows for one image are refused."""
    previous = rows.setdefault(name, fields)
    if previous is not fields and previous != fields:
        raise UserError(f"{path}:{number}: a second, different landmark row for {name} (keep one)")


def pairs_by_key(pairs: list[tuple[str, str, bool, int]], packed: set[str]) -> tuple[list[Pair], int]:
    """The pairs whose both images were packed, by sample key; and how many could not be resolved."""
    out, dropped = [], 0
    for a, b, same, fold in pairs:
        ka, kb = sample_key(a), sample_key(b)
        if ka in packed and kb in packed:
            out.append(Pair(ka, kb, same, fold))
        else:
            dropped += 1
    return out, dropped
