"""IJB-B / IJB-C 1:1 template verification, on the data as InsightFace ships it.

    python eval/ijb.py --checkpoint CKPT --ijb IJB_release/IJBC [--batch-size 256 --device cuda]
        [--json ijbc.json] [--roc ijbc_roc.png]

Layout (`ijbc` or `ijbb` prefix): `loose_crop/<image>`, `meta/ijbc_face_tid_mid.txt` (`image
template media` per face), `meta/ijbc_name_5pts_score.txt` (`image x1 y1 ... x5 y5 score`, the
5 points in the image's pixels) and `meta/ijbc_template_pair_label.txt` (`template1 template2
label`). Each face is aligned with its 5 points to the standard template (preprocess/align.py),
embedded with its mirror image added and L2-normalized (the flip rule of eval/verify.py); a template's
feature is the mean over its media of each media's mean face feature, L2-normalized; a pair's score
is the cosine of its two templates. Reported: TAR at FAR 1e-6 ... 1e-1 (at most floor(FAR x
impostors) impostor pairs above the threshold, as eval/verification/metrics.py) and AUC; --roc draws the
curve. Only faces of templates that some pair uses are read. Faces are read and aligned by
--workers threads, a few batches ahead of the model.

Damaged meta files (a wrong field count, a template id or landmark that is not a number, an image
name outside loose_crop/, a face without points, a pair of an unknown template) stop the run before
any face is read, with one line naming the file and line. A face that cannot be used (its image
missing or unreadable, landmarks that preprocess/align.py's check_landmarks refuses: NaN, outside
the image, on a line, eyes on one spot, ...) is a reject: a warning names the file (and line), its
template pools its other faces, a pair whose template has no face left is left out of the figures,
and a summary line says how many; --json lists every reject.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np
import torch

from common.cli import CliParser, UserError, cpu_count, log, progress, run_cli
from common.fileio import atomic_write_text
from eval.embed import EmbedFn, flip_embed
from eval.verification.metrics import auc_score, tar_at_far
from models.load import add_model_arguments, model_from_args
from preprocess.align import check_landmarks, warp
from shards.format import parse_image_size
from shards.torch_pipeline import to_model_input

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class IJBData:
    name: str  # "IJBC" / "IJBB", from the meta file prefix
    images: list[Path]  # per face
    landmarks: np.ndarray  # [faces, 5, 2]
    landmark_lines: list[str]  # per face: "file:line" of its 5 points, for reject messages
    templates: np.ndarray  # [faces] template id
    media: np.ndarray  # [faces] media id
    pairs: np.ndarray  # [pairs, 2] template ids
    labels: np.ndarray  # [pairs] bool, genuine


@dataclass(frozen=True)
class Reject:
    """A face left out of its template: the file (and line) at fault, and why."""

    face: int  # row in IJBData
    where: str
    reason: str
    detail: str


def _rows(path: Path, fields: int | None) -> Iterator[tuple[int, list[str]]]:
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                parts = line.split()
                if not parts:
                    continue
                if fields is not None and len(parts) != fields:
                    raise UserError(f"{path}:{n}: {len(parts)} fields, expected {fields}")
                yield n, parts
    except FileNotFoundError:
        raise UserError(f"{path}: not found (expected InsightFace's layout: meta/, loose_crop/)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None


def _ints(path: Path, n: int, values: Sequence[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise UserError(f"{path}:{n}: expected integers, got {' '.join(values)!r}") from None


def _int_table(path: Path, cols: int) -> np.ndarray:
    """A whitespace-separated integer table: parsed in C (IJB-C lists 15.7 M pairs); on any oddity
    the file is read again line by line for an error naming the line."""
    try:
        text = path.read_bytes().decode("ascii")
    except FileNotFoundError:
        raise UserError(f"{path}: not found (expected InsightFace's layout: meta/, loose_crop/)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # numpy warns (and stops) at a bad token
        try:
            values = np.fromstring(text, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            values = None
    lines = sum(1 for line in text.splitlines() if line.strip())
    if values is None or values.size != cols * lines:
        for n, parts in _rows(path, cols):
            _ints(path, n, parts)
        raise UserError(f"{path}: expected {cols} integers per line")  # not reached: the loop names the line
    return values.reshape(-1, cols)


def read_ijb(root: Path) -> IJBData:
    """The meta files of an IJB-B or IJB-C release folder, checked against each other. A damaged
    or mismatched file is a UserError naming the file and line; landmarks that are numbers but
    cannot be aligned (NaN, a line, ...) make their face a reject when it is read (`embed_faces`)."""
    meta = root / "meta"
    prefix = next((p for p in ("ijbc", "ijbb") if (meta / f"{p}_face_tid_mid.txt").is_file()), None)
    if prefix is None:
        raise UserError(f"{meta}: no ijbc_face_tid_mid.txt or ijbb_face_tid_mid.txt (an IJB release folder?)")
    faces = meta / f"{prefix}_face_tid_mid.txt"
    names, tids, mids = [], [], []
    for n, (name, t, m) in _rows(faces, 3):
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise UserError(f"{faces}:{n}: image name {name!r} is not a file under loose_crop/")
        names.append(name)
        tid, mid = _ints(faces, n, (t, m))
        tids.append(tid)
        mids.append(mid)
    if not names:
        raise UserError(f"{faces}: no faces listed")
    pts_file = meta / f"{prefix}_name_5pts_score.txt"
    points: dict[str, np.ndarray] = {}
    lines: dict[str, int] = {}
    for n, parts in _rows(pts_file, 12):
        try:
            values = np.array(parts[1:11], dtype=np.float64).reshape(5, 2)
        except ValueError:
            raise UserError(
                f"{pts_file}:{n}: landmarks must be numbers, got {' '.join(parts[1:11])!r}"
            ) from None
        name = parts[0]
        if name in points and not np.array_equal(points[name], values, equal_nan=True):
            raise UserError(f"{pts_file}:{n}: other points for face {name!r} than on line {lines[name]}")
        points[name], lines[name] = values, n
    missing = next((nm for nm in names if nm not in points), None)
    if missing is not None:
        raise UserError(f"{pts_file}: no 5 points for face {missing!r} of {faces.name}")
    pair_file = meta / f"{prefix}_template_pair_label.txt"
    table = _int_table(pair_file, 3)
    if not table.size:
        raise UserError(f"{pair_file}: no template pairs")
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if bad.size:
        raise UserError(f"{pair_file}: pair {bad[0] + 1}: label must be 0 or 1, got {table[bad[0], 2]}")
    pairs, labels = table[:, :2], table[:, 2] == 1
    if labels.all() or not labels.any():
        raise UserError(f"{pair_file}: only {'genuine' if labels.all() else 'impostor'} pairs (label 1 / 0)")
    unknown = ~np.isin(pairs, np.array(tids, np.int64))
    if unknown.any():
        row = int(np.flatnonzero(unknown.any(axis=1))[0])
        t = int(pairs[row][unknown[row]][0])
        raise UserError(f"{pair_file}: pair {row + 1}: template {t} has no faces in {faces.name}")
    if not (root / "loose_crop").is_dir():
        raise UserError(
            f"{root / 'loose_crop'}: no such folder (expected InsightFace's layout: meta/, loose_crop/)"
        )
    return IJBData(
        prefix.upper(),
        [root / "loose_crop" / nm for nm in names],
        np.stack([points[nm] for nm in names]),
        [f"{pts_file}:{lines[nm]}" for nm in names],
        np.array(tids, np.int64),
        np.array(mids, np.int64),
        pairs,
        labels,
    )


def _aligned_batch(
    data: IJBData, rows: np.ndarray, size: tuple[int, int]
) -> tuple[torch.Tensor, list[int], list[Reject]]:
    """(model input of the faces that could be read and aligned, their positions in `rows`, rejects)."""
    out = np.empty((len(rows), size[0], size[1], 3), np.uint8)
    kept, rejects = [], []
    for k, row in enumerate(rows.tolist()):
        path = data.images[row]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            found = path.is_file()
            reason = (
                ("image_unreadable", "not a decodable image") if found else ("image_missing", "no such file")
            )
            rejects.append(Reject(row, str(path), *reason))
            continue
        bad = check_landmarks(data.landmarks[row], size, (image.shape[1], image.shape[0]))
        if bad is not None:
            rejects.append(Reject(row, data.landmark_lines[row], *bad))
            continue
        out[len(kept)] = cv2.cvtColor(warp(image, data.landmarks[row], size), cv2.COLOR_BGR2RGB)
        kept.append(k)
    return to_model_input(torch.from_numpy(out[: len(kept)]), torch.device("cpu"), False), kept, rejects


def embed_faces(
    embed: EmbedFn,
    data: IJBData,
    rows: np.ndarray,
    image_size: tuple[int, int],
    *,
    batch_size: int = 128,
    flip: bool = True,
    workers: int = 2,
    show_progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[Reject]]:
    """(L2-normalized embeddings, the rows they are of, rejects) of faces `rows`, aligned on the
    fly; a face that cannot be read or aligned is a reject, never the end of the run."""
    chunks = [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
    feats: list[np.ndarray] = []
    embedded: list[np.ndarray] = []
    rejects: list[Reject] = []
    done = 0
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool, progress("[bold]{task.description}") as bar:
        task = bar.add_task(data.name, total=len(rows), visible=show_progress)
        ahead = max(workers, 1) + 1
        jobs = [pool.submit(_aligned_batch, data, c, image_size) for c in chunks[:ahead]]
        for i, chunk in enumerate(chunks):
            images, kept, bad = jobs[i].result()
            jobs[i] = None  # type: ignore[call-overload]
            if i + ahead < len(chunks):
                jobs.append(pool.submit(_aligned_batch, data, chunks[i + ahead], image_size))
            if kept:
                feats.append(flip_embed(embed, images, flip))
                embedded.append(chunk[kept])
            rejects += bad
            done += len(chunk)
            bar.update(task, completed=done)
    if not feats:
        return np.empty((0, 0), np.float32), np.empty(0, np.int64), rejects
    return np.concatenate(feats), np.concatenate(embedded), rejects


def template_features(
    emb: np.ndarray, templates: np.ndarray, media: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted template ids, L2-normalized features): per template the mean over its media of each
    media's mean face embedding, so a video with 100 frames weighs as much as one still photo."""
    pairs = np.stack([templates, media], axis=1)
    keys, media_of_face = np.unique(pairs, axis=0, return_inverse=True)
    media_of_face = media_of_face.reshape(-1)
    media_feat = np.zeros((len(keys), emb.shape[1]), np.float64)
    np.add.at(media_feat, media_of_face, emb)
    media_feat /= np.bincount(media_of_face, minlength=len(keys))[:, None]
    tids, template_of_media = np.unique(keys[:, 0], return_inverse=True)
    feat = np.zeros((len(tids), emb.shape[1]), np.float64)
    np.add.at(feat, template_of_media, media_feat)
    feat /= np.bincount(template_of_media, minlength=len(tids))[:, None]
    feat /= np.maximum(np.linalg.norm(feat, axis=1, keepdims=True), 1e-12)
    return tids, feat


def pair_cosines(feat: np.ndarray, rows: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Dot products of feature rows rows[:, 0] and rows[:, 1], a million pairs at a time (IJB-C's
    15.7 M pairs of 512-d features would otherwise gather 60 GB)."""
    out = np.empty(len(rows), np.float64)
    for s in range(0, len(rows), chunk):
        r = rows[s : s + chunk]
        out[s : s + chunk] = np.einsum("ij,ij->i", feat[r[:, 0]], feat[r[:, 1]])
    return out


def far_key(far: float) -> str:
    """tar_at_far_1e-3 style, as the Metrics JSON of docs/CONTRACTS.md."""
    return f"tar_at_far_{far:.0e}".replace("e-0", "e-")


def pair_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {far_key(far): tar_at_far(scores, labels, far)[0] for far in FARS}
    out.update(
        {
            "auc": auc_score(scores, labels),
            "num_pairs": int(labels.size),
            "num_genuine": int(labels.sum()),
            "num_impostor": int((~labels).sum()),
        }
    )
    return out


def evaluate_ijb(
    embed: EmbedFn,
    root: Path,
    image_size: tuple[int, int],
    *,
    batch_size: int = 128,
    flip: bool = True,
    workers: int = 2,
    show_progress: bool = True,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(metrics, pair scores, pair labels) of the 1:1 protocol.

    A face that cannot be used (image missing or unreadable, landmarks that cannot be aligned) is
    left out of its template, which pools its other faces; a pair whose template has no face left
    is left out of the figures. The metrics count both ("rejected_faces" lists every face, where
    and why); a UserError when no genuine or no impostor pair is left."""
    start = time.perf_counter()
    data = read_ijb(root)
    rows = np.flatnonzero(np.isin(data.templates, data.pairs))
    emb, embedded, rejects = embed_faces(
        embed,
        data,
        rows,
        image_size,
        batch_size=batch_size,
        flip=flip,
        workers=workers,
        show_progress=show_progress,
    )
    if not embedded.size:
        raise UserError(f"{root}: none of the {len(rows)} faces can be used ({_reject_summary(rejects)})")
    tids, feat = template_features(emb, data.templates[embedded], data.media[embedded])
    where = np.minimum(np.searchsorted(tids, data.pairs), len(tids) - 1)
    scored = (tids[where] == data.pairs).all(axis=1)
    labels = data.labels[scored]
    if labels.all() or not labels.any():
        lacking = "impostor pair" if labels.any() else "genuine pair" if labels.size else "pair"
        raise UserError(
            f"{root}: no {lacking} is left once the faces that cannot be used are left out "
            f"({_reject_summary(rejects)})"
        )
    scores = pair_cosines(feat, where[scored])
    metrics = pair_metrics(scores, labels)
    emptied = np.unique(data.pairs).size - tids.size  # templates that lost every face
    touched = np.unique(data.templates[[r.face for r in rejects]]).size  # ... some or every face
    metrics.update(
        {
            "set": data.name,
            "num_faces": int(embedded.size),
            "num_templates": int(tids.size),
            "num_faces_rejected": len(rejects),
            "rejects_by_reason": dict(Counter(r.reason for r in rejects).most_common()),
            "templates_without_faces": int(emptied),
            "templates_missing_faces": int(touched - emptied),
            "skipped_pairs": int((~scored).sum()),
            "skipped_genuine_pairs": int((~scored & data.labels).sum()),
            "rejected_faces": [
                {
                    "image": data.images[r.face].relative_to(root / "loose_crop").as_posix(),
                    "where": r.where,
                    "reason": r.reason,
                    "detail": r.detail,
                }
                for r in rejects
            ],
            "flip": flip,
            "seconds": round(time.perf_counter() - start, 3),
        }
    )
    return metrics, scores, labels


def _reject_summary(rejects: Sequence[Reject]) -> str:
    """'image_missing 3, landmarks_nan 1; first: FILE:LINE: landmarks_nan (detail)'."""
    counts = ", ".join(f"{reason} {n}" for reason, n in Counter(r.reason for r in rejects).most_common())
    first = rejects[0]
    return f"{counts}; first: {first.where}: {first.reason} ({first.detail})"


def report_rejects(metrics: dict[str, Any], shown: int = 10) -> None:
    """The rejected faces (the first `shown` of them) and what they do to the figures, on stderr."""
    rejected = metrics["rejected_faces"]
    if not rejected:
        return
    for r in rejected[:shown]:
        log(f"warning: {r['where']}: {r['reason']} ({r['detail']}), face {r['image']} not embedded")
    if len(rejected) > shown:
        log(f"warning: ... and {len(rejected) - shown} more faces (--json lists them all)")
    counts = ", ".join(f"{reason} {n}" for reason, n in metrics["rejects_by_reason"].items())
    total = metrics["num_pairs"] + metrics["skipped_pairs"]
    genuine, skipped = metrics["skipped_genuine_pairs"], metrics["skipped_pairs"]
    log(
        f"warning: {metrics['set']}: {len(rejected)} of {len(rejected) + metrics['num_faces']} faces not "
        f"embedded ({counts}); {metrics['templates_missing_faces']} templates pooled from their other "
        f"faces; {metrics['templates_without_faces']} templates with no face left: {skipped} of {total} "
        f"pairs ({genuine} genuine, {skipped - genuine} impostor) left out of the figures"
    )


def load_model(args: argparse.Namespace) -> tuple[EmbedFn, str, tuple[int, int]]:
    model = model_from_args(args, image_size=args.image_size or (112, 112))
    if args.image_size and tuple(args.image_size) != model.image_size:
        raise UserError(f"--image-size {args.image_size}: {model.path} takes {model.image_size} faces")
    return model.embed, model.name, model.image_size


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(
        prog="eval/ijb.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_model_arguments(p)
    p.add_argument("--ijb", type=Path, required=True, help="IJB release folder (meta/, loose_crop/)")
    p.add_argument("--image-size", type=parse_image_size, help="aligned size for an ONNX model (default 112)")
    p.add_argument("--batch-size", type=int, default=None, help="faces per forward (default 8 cpu, 256 cuda)")
    p.add_argument(
        "--workers", type=int, default=min(8, cpu_count()), help="threads reading and aligning faces"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--no-flip", action="store_true", help="no flip test-time augmentation")
    p.add_argument("--json", type=Path, help="write the metrics JSON here")
    p.add_argument("--roc", type=Path, help="draw the ROC curve into this PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    batch = args.batch_size or (256 if args.device == "cuda" else 8)
    if batch < 1 or args.workers < 1:
        raise UserError("--batch-size and --workers must be at least 1")
    embed, model_name, size = load_model(args)
    metrics, scores, labels = evaluate_ijb(
        embed,
        args.ijb,
        size,
        batch_size=batch,
        flip=not args.no_flip,
        workers=args.workers,
        show_progress=not args.quiet,
    )
    metrics["model"] = model_name
    report_rejects(metrics)
    tars = "  ".join(f"{far:.0e}: {metrics[far_key(far)]:.4f}" for far in FARS)
    print(
        f"{metrics['set']} 1:1 TAR@FAR  {tars}  AUC {metrics['auc']:.4f}  "
        f"({metrics['num_pairs']} pairs, {metrics['num_templates']} templates, "
        f"{metrics['num_faces']} faces)"
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=1) + "\n", what="metrics JSON")
    if args.roc:
        from eval.verification import plots

        title = f"{metrics['set']} 1:1: {Path(model_name.split()[0]).name}"
        plots.save_rocs(args.roc, {metrics["set"]: (scores, labels)}, title)
    print(f"{metrics['num_faces']} faces in {metrics['seconds']:.1f} s", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
