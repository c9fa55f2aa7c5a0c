"""An InsightFace verification pack (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...) as verification shards.

    python eval/import_bin.py --bin agedb_30.bin --out data/shards/agedb_30 [--name agedb_30]

A pack is a pickle of `(images, issame)`: a list of 2N encoded, already aligned faces (JPEG or PNG)
and N booleans (a list, or a numpy bool array), pair i being images 2i and 2i+1. Packs were written
by Python 2 or 3, so they are read with `encoding="bytes"`. The result reads like LFW shards
(`eval/verify.py --sets agedb_30=OUT`): one sample per image, the pairs in the manifest with 10
contiguous folds (the standard protocol: folds of consecutive pairs, as sklearn's KFold without
shuffling).

Safety: the pickle is read by an unpickler that knows only lists, tuples, bytes, bools, ints and
numpy bool arrays; numpy's own unpickling code never runs (small stand-ins rebuild bool arrays
from their raw bytes). A pack that asks for any other global is refused in one line before
anything it names is called.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from common.cli import CliParser, UserError, run_cli
from common.fileio import fsync_dir, tmp_path_for
from eval.verification.pairsets import contiguous_folds
from shards.format import FORMAT_NAME, FORMAT_VERSION, scaled_template
from shards.manifest import MANIFEST_NAME, Pair, ShardInfo, write_manifest
from shards.writer import ShardWriter

NUM_FOLDS = 10
JPEG_QUALITY = 95  # only for images that do not come as JPEG (PNG packs); JPEGs are kept byte for byte
SAMPLES_PER_SHARD = 5000
CREATED_BY = "facetrain 0.1.0"


# ------------------------------------------------------------------------------- restricted pickle


class _Refused(Exception):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class _NdarrayType:
    """Stands for `numpy.ndarray` in a pickle; only `_reconstruct` accepts it."""


class _BoolDtype:
    """Stands for `numpy.dtype('b1')`; its pickled state (byte order and flags) carries nothing else."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple):
            raise _Refused("a numpy dtype with an unexpected state")


class _BoolArray:
    """Stands for a numpy bool array until its state (shape, dtype, raw bytes) arrives."""

    values: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _Refused("a numpy array with an unexpected state")
        _, shape, dtype, _, raw = state
        if not isinstance(dtype, _BoolDtype) or not isinstance(raw, bytes):
            raise _Refused("a numpy array that is not of booleans")
        if not (isinstance(shape, tuple) and len(shape) == 1 and shape[0] == len(raw)):
            raise _Refused("a numpy bool array that is not one-dimensional")
        self.values = np.frombuffer(raw, dtype=np.uint8) != 0


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _BoolArray:
    if cls is not _NdarrayType:
        raise _Refused("numpy's _reconstruct of something other than an ndarray")
    return _BoolArray()


def _dtype(name: Any, align: Any = False, copy: Any = True) -> _BoolDtype:
    if name not in ("b1", b"b1", "?", b"?"):
        raise _Refused(f"numpy dtype {name!r} (only booleans belong in a pack)")
    return _BoolDtype()


def _scalar(dtype: Any, data: Any) -> bool:
    if not isinstance(dtype, _BoolDtype) or not isinstance(data, bytes) or len(data) != 1:
        raise _Refused("a numpy scalar that is not a boolean")
    return data != b"\x00"


def _latin1(text: Any, encoding: str = "utf-8") -> bytes:
    # Python 3 writes bytes as _codecs.encode(str, "latin1") at protocol 2.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode other than the latin1 form of bytes")
    return text.encode("latin1")


_ALLOWED = {("_codecs", "encode"): _latin1, ("numpy", "ndarray"): _NdarrayType, ("numpy", "dtype"): _dtype}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _reconstruct
    _ALLOWED[(_mod, "scalar")] = _scalar


class _PackUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent object id")


def _plain(obj: Any) -> Any:
    return obj.values if isinstance(obj, _BoolArray) else obj


def read_pack(path: Path) -> tuple[list[bytes], np.ndarray]:
    """(2N encoded images, N booleans) from a pack; UserError naming the file on anything else."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    try:
        obj = _PackUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as err:
        raise UserError(
            f"{path}: refused: the pickle asks for {err.what}, which a verification "
            "pack never holds (nothing in it was run)"
        ) from None
    except Exception as err:  # a damaged pickle raises many types (UnpicklingError, EOFError, ...)
        raise UserError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise UserError(f"{path}: expected a pickle of (images, issame), found {type(obj).__name__}")
    images, issame = _plain(obj[0]), _plain(obj[1])
    if not isinstance(images, (list, tuple)) or not all(isinstance(b, bytes) for b in images):
        raise UserError(f"{path}: the first item must be a list of encoded images (bytes)")
    if isinstance(issame, (list, tuple)) and all(isinstance(v, (bool, int)) for v in issame):
        issame = np.array([bool(v) for v in issame], dtype=bool)
    if not isinstance(issame, np.ndarray):
        raise UserError(f"{path}: the second item must be a list (or numpy array) of booleans")
    if len(images) != 2 * len(issame) or len(issame) == 0:
        raise UserError(f"{path}: {len(images)} images for {len(issame)} pairs (expected 2 per pair)")
    return list(images), issame


# --------------------------------------------------------------------------------------- shards


def _as_jpeg(blob: bytes, index: int, path: Path) -> tuple[bytes, tuple[int, int]]:
    """The JPEG to store (the original when it is one) and the image's (H, W)."""
    image = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"{path}: image {index} does not decode (not a JPEG or PNG)")
    if blob[:2] == b"\xff\xd8":
        return blob, image.shape[:2]
    ok, jpg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise UserError(f"{path}: image {index} cannot be re-encoded as JPEG")
    return jpg.tobytes(), image.shape[:2]


def identity_labels(issame: np.ndarray) -> np.ndarray:
    """A label per image: images joined by a genuine pair share one, any other image has its own.

    Packs carry no identities; these are the finest grouping the pairs prove (union-find), numbered
    by first appearance so labels are contiguous from 0.
    """
    parent = list(range(2 * len(issame)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in np.flatnonzero(issame):
        parent[root(2 * i + 1)] = root(2 * i)
    first: dict[int, int] = {}
    return np.array([first.setdefault(root(i), len(first)) for i in range(len(parent))], dtype=np.int64)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that cannot take the shards, before anything is written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: folder is not empty (pass --overwrite to replace its shards)")


def _is_shard_file(path: Path) -> bool:
    return path.is_file() and (path.suffix in (".tar", ".idx", ".tmp") or path.name == MANIFEST_NAME)


def _publish(staged: Path, out: Path) -> None:
    """Move the complete set from `staged` into `out`, replacing the old shards: the manifest last, so
    `out` holds a manifest only once every shard it lists is there."""
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        if _is_shard_file(p):
            p.unlink()
    files = sorted(staged.iterdir(), key=lambda p: p.name == MANIFEST_NAME)
    for p in files:
        os.replace(p, out / p.name)
    fsync_dir(out)


def import_pack(
    pack: Path, out: Path, name: str, *, overwrite: bool = False, command: str = ""
) -> dict[str, Any]:
    """Write OUT/<name>-NNNNNN.tar shards and a manifest with the pairs; returns a summary.

    The set is written into `<out>.tmp` and moved into `out` only once complete: a pack that fails
    half-way (an image that does not decode) leaves `out` as it was."""
    images, issame = read_pack(pack)
    if len(issame) < NUM_FOLDS:
        raise UserError(
            f"{pack}: {len(issame)} pairs, fewer than the {NUM_FOLDS} folds of the protocol; nothing written"
        )
    _check_out(out, overwrite)
    staged = tmp_path_for(out.resolve())  # a sibling folder: "." has no name of its own
    shutil.rmtree(staged, ignore_errors=True)  # a leftover of a killed run
    try:
        staged.mkdir(parents=True)
    except OSError as err:
        raise UserError(f"{staged}: cannot create the folder ({err.strerror or err})") from None
    try:
        summary = _write_set(images, issame, pack, staged, name, command)
        _publish(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return {"out": str(out), **summary}


def _write_set(
    images: list[bytes], issame: np.ndarray, pack: Path, out: Path, name: str, command: str
) -> dict[str, Any]:
    labels = identity_labels(issame)
    keys = [f"{name}__{i:06d}" for i in range(len(images))]
    classes = [f"{name}-{k:06d}" for k in range(int(labels.max()) + 1)]
    infos: list[ShardInfo] = []
    size: tuple[int, int] | None = None
    reencoded = 0
    writer: ShardWriter | None = None
    try:
        for i, blob in enumerate(images):
            jpeg, hw = _as_jpeg(blob, i, pack)
            reencoded += jpeg is not blob
            if size is None:
                size = hw
            elif hw != size:
                raise UserError(f"{pack}: image {i} is {hw[0]}x{hw[1]}, the first is {size[0]}x{size[1]}")
            if i % SAMPLES_PER_SHARD == 0:
                if writer is not None:
                    infos.append(writer.close())
                writer = ShardWriter(out / f"{name}-{i // SAMPLES_PER_SHARD:06d}.tar")
            label = int(labels[i])
            writer.add(
                keys[i],
                jpeg,
                label,
                {
                    "identity": classes[label],
                    "label": label,
                    "source": f"{pack.name}#{i}",
                    "landmarks": scaled_template(size),
                },
            )
        infos.append(writer.close())  # type: ignore[union-attr]
        writer = None
    finally:
        if writer is not None:
            writer.abort()
    folds = contiguous_folds(len(issame), NUM_FOLDS)
    pairs = [
        Pair(keys[2 * i], keys[2 * i + 1], bool(s), int(f))
        for i, (s, f) in enumerate(zip(issame, folds, strict=True))
    ]
    write_manifest(
        out,
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dataset": name,
            "split": "test",
            "num_samples": len(images),
            "num_classes": len(classes),
            "classes": classes,
            "image_size": list(size),
            "template": scaled_template(size),  # type: ignore[arg-type]
            "jpeg_quality": JPEG_QUALITY,
            "num_rejects": 0,
            "num_inputs": len(images),
            "shards": [asdict(s) for s in infos],
            "pairs": [asdict(p) for p in pairs],
            "source": str(pack),
            "reencoded": reencoded,
            "seed": 0,
            "command": command,
            "created_by": CREATED_BY,
        },
    )
    return {
        "name": name,
        "images": len(images),
        "pairs": len(pairs),
        "genuine": int(issame.sum()),
        "folds": NUM_FOLDS,
        "image_size": list(size),  # type: ignore[arg-type]
        "reencoded": reencoded,
        "shards": len(infos),
    }


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(
        prog="eval/import_bin.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--bin", type=Path, required=True, help="the pack (e.g. agedb_30.bin)")
    p.add_argument("--out", type=Path, required=True, help="shard folder to write")
    p.add_argument("--name", help="set name: shard prefix and dataset (default: the pack's file stem)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty --out")
    return p


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = args.name or args.bin.stem
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise UserError(f"--name {name!r}: use letters, digits, '_' or '-'")
    command = "python eval/import_bin.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    summary = import_pack(args.bin, args.out, name, overwrite=args.overwrite, command=command)

    print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
