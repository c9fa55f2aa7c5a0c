"""Aligned WebDataset shards from VGGFace2, LFW, InsightFace RecordIO or a folder per identity:
parallel, deterministic, resumable.

    python preprocess/build_shards.py vggface2 --root DIR --split train --out OUT [--detect]
    python preprocess/build_shards.py lfw --root DIR --out OUT [--landmarks FILE] [--pairs FILE] [--detect]
    python preprocess/build_shards.py rec --root DIR --out OUT          (train.rec, train.idx, property)
    python preprocess/build_shards.py folders --root DIR --out OUT (--aligned | --landmarks FILE | --detect)

The plan (which input goes to which shard, in which order) is a pure function of the inputs and the
options, so a rerun after a crash recomputes it, skips the shards that were completed, and ends
with the same bytes as an uninterrupted run. Per-shard state lives in OUT/.build/ until the
manifest is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import multiprocessing.forkserver
import shlex
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.cli import CliParser, UserError, cpu_count, log, positive, progress, run_cli
from common.fileio import TMP_SUFFIX, atomic_write_text
from common.folder_lock import folder_lock
from preprocess import _work
from preprocess.datasets import DatasetInputs, Entry, pairs_by_key, read_lfw, read_vggface2
from preprocess.folders import read_folders
from preprocess.recordio import read_rec
from shards.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_SUFFIX,
    SHARD_SUFFIX,
    index_name,
    parse_image_size,
    scaled_template,
    shard_name,
)
from shards.manifest import MANIFEST_NAME, ShardInfo, write_manifest
from shards.writer import ShardWriter

STATE_DIR = ".build"
REJECTS_NAME = "rejects.jsonl"
BATCH = 32  # images per pool task: small enough to balance, large enough to amortize IPC
CREATED_BY = "facetrain 0.1.0"


@dataclass(frozen=True)
class Options:
    dataset: str
    out: Path
    prefix: str
    image_size: tuple[int, int]
    quality: int
    seed: int
    samples_per_shard: int
    workers: int
    max_reject_fraction: float
    reduce: bool
    overwrite: bool
    mode: str = "landmarks"  # how workers get the face: "landmarks" | "detect" | "aligned" (_work.Job)
    single_face_only: bool = False


@dataclass
class Plan:
    shards: list[list[tuple[Entry, int]]]  # per shard: (entry, label) in write order
    classes: list[str]
    early_rejects: list[dict[str, str]]  # inputs refused before any image was read
    num_inputs: int
    fingerprint: str


# ---------------------------------------------------------------------------------------------- plan


def select(entries: list[Entry], identities: int | None, limit: int | None) -> list[Entry]:
    """--identities N keeps the first N identities in sorted order; --limit N the first N inputs."""
    if identities is not None:
        keep = set(sorted({e.identity for e in entries})[:identities])
        entries = [e for e in entries if e.identity in keep]
    if limit is not None:
        entries = entries[:limit]
    return entries


def reject_key_collisions(entries: list[Entry]) -> list[Entry]:
    """Two inputs whose sample keys are the same (`a.b.jpg` and `a_b.jpg`, `x.jpg` and `x.png`: see
    shards/format.py) would be two samples of one key in a shard: the first by path is kept, each
    other is a reject naming it."""
    keys = [e.key if e.reason is None else None for e in entries]
    first: dict[str, int] = {}
    for i in sorted(range(len(entries)), key=lambda i: entries[i].rel):
        if keys[i] is not None:
            first.setdefault(keys[i], i)
    return [
        e
        if key is None or first[key] == i
        else replace(e, reason="key_collision", detail=f"same sample key {key} as {entries[first[key]].rel}")
        for i, (e, key) in enumerate(zip(entries, keys))
    ]


def make_plan(entries: list[Entry], opts: Options) -> Plan:
    entries = reject_key_collisions(entries)
    usable = [e for e in entries if e.reason is None]
    early = [_reject(e.rel, e.reason or "", e.detail or "") for e in entries if e.reason is not None]
    classes = sorted({e.identity for e in usable})
    label_of = {name: i for i, name in enumerate(classes)}
    order = np.random.default_rng(opts.seed).permutation(len(usable)) if usable else []
    shuffled = [(usable[i], label_of[usable[i].identity]) for i in order]
    size = opts.samples_per_shard
    shards = [shuffled[i : i + size] for i in range(0, len(shuffled), size)]
    digest = hashlib.sha256()
    settings = [opts.dataset, opts.prefix, list(opts.image_size), opts.quality, opts.seed, size, opts.reduce]
    if opts.mode != "landmarks":  # (kept out of the list otherwise: fingerprints of existing builds hold)
        settings += [opts.mode, opts.single_face_only]
    digest.update(json.dumps(settings).encode())
    for entry, label in shuffled:
        digest.update(f"{entry.rel}\t{label}\t{entry.landmarks}\n".encode())
    return Plan(shards, classes, early, len(entries), digest.hexdigest())


def _reject(rel: str, reason: str, detail: str) -> dict[str, str]:
    return {"path": rel, "reason": reason, "detail": detail}


# ---------------------------------------------------------------------------------------------- state


class BuildState:
    """OUT/.build/: the plan fingerprint and one small JSON per completed shard (its info and rejects)."""

    def __init__(self, out: Path, prefix: str):
        self.dir = out / STATE_DIR
        self.out = out
        self.prefix = prefix

    def start(self, fingerprint: str) -> None:
        plan_file = self.dir / "plan.json"
        if plan_file.is_file():
            previous = json.loads(plan_file.read_text()).get("fingerprint")
            if previous != fingerprint:
                raise UserError(
                    f"{self.out}: holds an unfinished build of different inputs or options "
                    "(rerun with the same ones, or pass --overwrite to start again)"
                )
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan_file, json.dumps({"fingerprint": fingerprint}), what="build state")

    def done(self, index: int) -> dict[str, Any] | None:
        """The saved state of a completed shard, or None when it must be (re)built."""
        state = self.dir / f"{index:06d}.json"
        tar = self.out / shard_name(self.prefix, index)
        if not (state.is_file() and tar.is_file() and (self.out / index_name(tar.name)).is_file()):
            return None
        data = json.loads(state.read_text())
        if data["shard"]["bytes"] != tar.stat().st_size:
            return None
        return data

    def save(self, index: int, info: ShardInfo, rejects: list[dict[str, str]], reductions: Counter) -> None:
        data = {"shard": asdict(info), "rejects": rejects, "reductions": dict(reductions)}
        atomic_write_text(self.dir / f"{index:06d}.json", json.dumps(data), what="build state")

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def clear_output(out: Path, prefix: str) -> None:
    """--overwrite: remove this tool's files for this prefix (and nothing else) from OUT."""
    for path in out.glob(f"{prefix}-*"):
        if path.suffix in (SHARD_SUFFIX, INDEX_SUFFIX, TMP_SUFFIX):
            path.unlink()
    for name in (MANIFEST_NAME, REJECTS_NAME):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- run


def _settings(inputs: DatasetInputs, opts: Options) -> _work.Settings:
    return _work.Settings(
        str(inputs.image_root), opts.image_size, opts.quality, opts.reduce, opts.mode, opts.single_face_only
    )


def _rows(inputs: DatasetInputs, part: list[tuple[Entry, int]]) -> list[_work.Row]:
    """The worker's rows for a part of a shard (see _work.Row)."""
    names = inputs.identity_names
    return [
        (e.rel, e.identity, label, e.landmarks, e.bbox, names.get(e.identity), e.source, e.span)
        for e, label in part
    ]


POOL_PRELOAD = ("preprocess._work",)  # what the pool's forkserver imports once, not each worker


def _pool_context():
    """The forkserver context of the worker pool.

    forkserver, not fork: a parent that already ran OpenCV has a thread pool that a forked child
    inherits broken (workers hang in their first parallel cv2 call). The server imports the job
    module once; each worker forks from that clean process in milliseconds.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(POOL_PRELOAD))
    return ctx


def start_pool_server() -> None:
    """Start the forkserver now, so its imports (OpenCV, NumPy) overlap the reading of the inputs."""
    _pool_context()
    multiprocessing.forkserver.ensure_running()


@dataclass
class Done:
    """What the build has so far: per completed shard its info, and the rejects and decode reductions."""

    infos: dict[int, ShardInfo]
    rejects: list[dict[str, str]]
    reductions: Counter


def _completed(state: BuildState, plan: Plan) -> tuple[Done, list[int]]:
    """The shards a previous run completed (kept) and the indices still to build."""
    done, pending = Done({}, list(plan.early_rejects), Counter()), []
    for index in range(len(plan.shards)):
        saved = state.done(index)
        if saved is None:
            pending.append(index)
            continue
        done.infos[index] = ShardInfo(**saved["shard"])
        done.rejects.extend(saved["rejects"])
        done.reductions.update(saved.get("reductions", {}))
    return done, pending


def build(inputs: DatasetInputs, plan: Plan, opts: Options, command: str) -> dict[str, Any]:
    state = BuildState(opts.out, opts.prefix)
    state.start(plan.fingerprint)
    done, pending = _completed(state, plan)
    if done.infos:
        log(f"resuming: {len(done.infos)} of {len(plan.shards)} shards already complete")
    allowed = math.floor(opts.max_reject_fraction * plan.num_inputs)
    _check_rejects(len(done.rejects), allowed, plan.num_inputs, opts, opts.out, done.rejects)
    todo = sum(len(plan.shards[i]) for i in pending)
    seconds, cpu = _align(inputs, plan, opts, state, done, pending, allowed)
    summary = _finish(inputs, plan, opts, command, done)
    state.remove()
    summary.update(
        {
            "seconds": round(seconds, 3),
            "images_per_s": round(todo / seconds, 1) if seconds > 0 else None,
            "cpu_ms_per_image": round(1e3 * cpu / todo, 3) if todo else None,  # parent and workers
        }
    )
    return summary


def _align(
    inputs: DatasetInputs,
    plan: Plan,
    opts: Options,
    state: BuildState,
    done: Done,
    pending: list[int],
    allowed: int,
) -> tuple[float, float]:
    """Align and pack the pending shards, in parts of BATCH inputs: the workers write each part's
    samples to a part file in OUT/.build/parts, the parent appends the parts to their shard in plan
    order. Returns (seconds, CPU seconds of the parent and the workers)."""
    parts_dir = state.dir / "parts"
    shutil.rmtree(parts_dir, ignore_errors=True)  # what a killed run left
    parts_dir.mkdir(parents=True)
    tasks = [
        (index, start, plan.shards[index][start : start + BATCH], parts_dir / f"{index:06d}-{start:09d}")
        for index in pending
        for start in range(0, len(plan.shards[index]), BATCH)
    ]
    settings = _settings(inputs, opts)
    # Rows are made as the pool takes them (imap's feeder thread), not all before the first starts.
    work = ((settings, _rows(inputs, part), str(part_file)) for _, _, part, part_file in tasks)
    todo = sum(len(part) for _, _, part, _ in tasks)
    started, parent_cpu, worker_cpu = time.perf_counter(), time.process_time(), 0.0
    pool = None
    if opts.workers > 1 and todo > BATCH:
        pool = _pool_context().Pool(opts.workers, initializer=_work.init_pool_worker)
        results = pool.imap(_work.run_part, work)
    else:
        _work.init_worker()
        results = map(_work.run_part, work)
    writer: ShardWriter | None = None
    shard_rejects: list[dict[str, str]] = []
    shard_reductions: Counter = Counter()
    try:
        with progress("aligning", ("rejects",)) as shown:
            bar = shown.add_task("align", total=todo, rejects=len(done.rejects))
            for (index, start, part, part_file), result in zip(tasks, results):
                worker_cpu += result.cpu
                if start == 0:
                    writer = ShardWriter(opts.out / shard_name(opts.prefix, index))
                    shard_rejects, shard_reductions = [], Counter()
                writer.add_part(part_file.read_bytes(), [members for _, members in result.samples])
                part_file.unlink()
                shard_rejects += [_reject(part[i][0].rel, why, detail) for i, why, detail in result.rejects]
                shard_reductions.update({str(r): n for r, n in result.reductions.items()})
                if start + len(part) == len(plan.shards[index]):  # the shard's last part
                    done.infos[index] = writer.close()
                    writer = None
                    state.save(index, done.infos[index], shard_rejects, shard_reductions)
                    done.rejects.extend(shard_rejects)
                    done.reductions.update(shard_reductions)
                    shard_rejects = []
                    _check_rejects(len(done.rejects), allowed, plan.num_inputs, opts, opts.out, done.rejects)
                shown.update(bar, advance=len(part), rejects=len(done.rejects) + len(shard_rejects))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    seconds = time.perf_counter() - started
    cpu = time.process_time() - parent_cpu  # the parent's (all of it, when there is no pool)
    return seconds, cpu + worker_cpu if pool is not None else cpu


def _finish(inputs: DatasetInputs, plan: Plan, opts: Options, command: str, done: Done) -> dict[str, Any]:
    """Drop empty shards, write rejects.jsonl and the manifest; the build's summary."""
    out, infos, rejects = opts.out, done.infos, done.rejects
    shards = [infos[i] for i in range(len(plan.shards)) if infos[i].samples > 0]
    for i in range(len(plan.shards)):  # a shard whose every input was rejected holds nothing
        if infos[i].samples == 0:
            (out / infos[i].file).unlink(missing_ok=True)
            (out / infos[i].index).unlink(missing_ok=True)
    rejects.sort(key=lambda r: r["path"])
    _write_rejects(out, rejects)
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dataset": inputs.name,
        "split": inputs.split,
        "num_samples": sum(s.samples for s in shards),
        "num_classes": len(plan.classes),
        "classes": plan.classes,
        "image_size": list(opts.image_size),
        "template": scaled_template(opts.image_size),
        "jpeg_quality": opts.quality,
        "num_rejects": len(rejects),
        "num_inputs": plan.num_inputs,
        "shards": [asdict(s) for s in shards],
    }
    extra: dict[str, Any] = {}
    if inputs.pairs is not None:
        rejected = {r["path"] for r in rejects}
        packed_keys = {e.key for shard in plan.shards for e, _ in shard if e.rel not in rejected}
        pairs, dropped = pairs_by_key(inputs.pairs, packed_keys)
        manifest["pairs"] = [asdict(p) for p in pairs]
        extra["pairs"] = len(pairs)
        extra["pairs_unresolved"] = dropped
        if dropped:
            log(
                f"warning: {dropped} of {len(inputs.pairs)} pairs name an image that was not packed; left out"
            )
    manifest.update({"seed": opts.seed, "command": command, "created_by": CREATED_BY})
    write_manifest(out, manifest)
    reasons = Counter(r["reason"] for r in rejects)
    return {
        "out": str(out),
        "dataset": inputs.name,
        "split": inputs.split,
        "inputs": plan.num_inputs,
        "samples": manifest["num_samples"],
        "classes": len(plan.classes),
        "shards": len(shards),
        "rejects": len(rejects),
        "reject_reasons": dict(sorted(reasons.items())),
        **extra,
        "decode_reductions": dict(sorted(done.reductions.items())),
    }


def _check_rejects(count: int, allowed: int, total: int, opts: Options, out: Path, rejects: list) -> None:
    if count > allowed:
        _write_rejects(out, sorted(rejects, key=lambda r: r["path"]))
        reasons = ", ".join(f"{k} {v}" for k, v in Counter(r["reason"] for r in rejects).most_common(3))
        raise UserError(
            f"{out / REJECTS_NAME}: {count} of {total} inputs rejected ({reasons}), more than "
            f"--max-reject-fraction {opts.max_reject_fraction}"
        )


def _write_rejects(out: Path, rejects: list[dict[str, str]]) -> None:
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects)
    atomic_write_text(out / REJECTS_NAME, lines, what="reject list")


# ---------------------------------------------------------------------------------------------- CLI


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, not {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = CliParser(prog="preprocess/build_shards.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="dataset", required=True, parser_class=CliParser)
    common = CliParser(add_help=False)
    common.add_argument("--root", type=Path, required=True, help="dataset root as it ships")
    common.add_argument("--out", type=Path, required=True, help="shard folder to write")
    common.add_argument(
        "--images", type=Path, help="image folder, when not in the standard place under --root"
    )
    common.add_argument(
        "--landmarks", type=Path, help="5-point landmark file, when not in the standard place"
    )
    common.add_argument("--prefix", help="shard file name prefix (default: lfw, vggface2-<split>)")
    common.add_argument(
        "--image-size", type=parse_image_size, default=(112, 112), help="output N or HxW (default 112)"
    )
    common.add_argument("--jpeg-quality", type=int, default=95, choices=range(1, 101), metavar="1..100")
    common.add_argument("--samples-per-shard", type=positive, default=5000)
    common.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    common.add_argument("--workers", type=positive, default=None, help="processes (default: all cores)")
    common.add_argument("--max-reject-fraction", type=_fraction, default=0.01)
    common.add_argument("--limit", type=positive, help="only the first N inputs (sorted by path)")
    common.add_argument("--identities", type=positive, help="only the first N identities (sorted)")
    common.add_argument(
        "--no-reduced-decode",
        dest="reduce",
        action="store_false",
        help="always decode at full size (slower; for comparison)",
    )
    common.add_argument("--overwrite", action="store_true", help="rebuild even if OUT holds a complete build")
    vgg = sub.add_parser("vggface2", parents=[common], help="VGGFace2 (<split>/<id>/<file>.jpg)")
    vgg.add_argument("--split", default="train", help="train or test (default train)")
    vgg.add_argument("--list", type=Path, help="image list, when not <root>/<split>_list.txt")
    lfw = sub.add_parser("lfw", parents=[common], help="LFW (lfw/<Name>/<Name>_<NNNN>.jpg)")
    lfw.add_argument("--pairs", type=Path, help="pairs file, when not <root>/pairs.txt")
    rec = sub.add_parser("rec", parents=[common], help="InsightFace RecordIO (train.rec/.idx, property)")
    rec.add_argument("--rec", type=Path, help="the .rec file, when not <root>/train.rec")
    folders = sub.add_parser("folders", parents=[common], help="a folder per identity (<id>/*.jpg|png)")
    folders.add_argument("--aligned", action="store_true", help="the images are already aligned crops")
    for detecting in (vgg, lfw, folders):
        detecting.add_argument(
            "--detect", action="store_true", help="find each face and its 5 points with the detector"
        )
        detecting.add_argument(
            "--single-face-only",
            action="store_true",
            help="with --detect: reject a photo with several faces (default: keep the largest, central one)",
        )
    return p


def read_inputs(args: argparse.Namespace) -> tuple[DatasetInputs, str, str]:
    """The inputs, the shard prefix and the job mode (see _work.Job) for the chosen dataset."""
    detect = getattr(args, "detect", False)
    if args.dataset == "rec":
        return read_rec(args.root, args.rec), args.prefix or "rec", "aligned"
    if args.dataset == "folders":
        choices = (("--aligned", args.aligned), ("--landmarks", args.landmarks), ("--detect", detect))
        given = [name for name, on in choices if on]
        if len(given) != 1:
            raise UserError(
                "preprocess/build_shards.py folders: give exactly one of --aligned, --landmarks FILE, "
                "--detect" + (f" (got {' and '.join(given)})" if given else "")
            )
        mode = "aligned" if args.aligned else "detect" if detect else "landmarks"
        return read_folders(args.root, args.landmarks), args.prefix or "folders", mode
    if args.dataset == "vggface2":
        inputs = read_vggface2(args.root, args.split, args.images, args.list, args.landmarks, detect)
        prefix = args.prefix or f"vggface2-{args.split}"
    else:
        inputs = read_lfw(args.root, args.images, args.landmarks, args.pairs, detect)
        prefix = args.prefix or "lfw"
    if detect:  # the detector finds the points: a missing or bad landmark row is no reason to reject
        inputs.entries = [
            replace(e, landmarks=None, reason=None, detail=None) if e.reason != "image_missing" else e
            for e in inputs.entries
        ]
    return inputs, prefix, "detect" if detect else "landmarks"


def _check_detector(mode: str) -> None:
    if mode != "detect":
        return
    try:
        _work.detector()
    except ImportError as err:
        raise UserError(
            f"--detect: the face detector (preprocess/detect.py) cannot be imported ({err}); "
            "install the project's requirements, or align with --landmarks FILE"
        ) from None


def run(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.root.is_dir():
        raise UserError(f"{args.root}: --root is not a folder")
    if (args.workers or cpu_count()) > 1:
        start_pool_server()
    inputs, prefix, mode = read_inputs(args)
    _check_detector(mode)
    opts = Options(
        dataset=args.dataset,
        out=args.out,
        prefix=prefix,
        image_size=args.image_size,
        quality=args.jpeg_quality,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers or cpu_count(),
        max_reject_fraction=args.max_reject_fraction,
        reduce=args.reduce,
        overwrite=args.overwrite,
        mode=mode,
        single_face_only=getattr(args, "single_face_only", False),
    )
    command = shlex.join(["python", "preprocess/build_shards.py", *(sys.argv[1:] if argv is None else argv)])
    out = opts.out
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out exists and is not a folder")
    for name, path in inputs.files.items():
        log(f"{name}: {path}")
    entries = select(inputs.entries, args.identities, args.limit)
    plan = make_plan(entries, opts)
    if not plan.shards:
        raise UserError(
            f"{args.root}: no usable images ({plan.num_inputs} inputs, all rejected or none found)"
        )
    # One build per --out: two would write (and remove) the same files.
    with folder_lock(out, "another build is writing to this folder; wait for it or choose another --out"):
        return _build_locked(inputs, plan, opts, command)


def _build_locked(inputs: DatasetInputs, plan: Plan, opts: Options, command: str) -> int:
    out = opts.out
    if (out / MANIFEST_NAME).is_file() and not (out / STATE_DIR).exists() and not opts.overwrite:
        log(f"{out / MANIFEST_NAME}: a complete build is already there; pass --overwrite to rebuild")
        return 0
    if opts.overwrite:
        clear_output(out, opts.prefix)
    log(
        f"{plan.num_inputs} inputs, {sum(map(len, plan.shards))} to align into {len(plan.shards)} shards, "
        f"{len(plan.classes)} identities, {len(plan.early_rejects)} rejected up front; {opts.workers} workers"
    )
    try:
        summary = build(inputs, plan, opts, command)
    except OSError as err:  # disk full, folder made read-only ...: the completed shards stay for a rerun
        _remove_temporaries(out, opts.prefix)
        raise UserError(
            f"{out}: cannot write the build ({err.strerror or err}); completed shards are kept, "
            "rerun the same command when it is fixed"
        ) from None
    log(
        f"done: {summary['samples']} samples in {summary['shards']} shards, {summary['rejects']} rejects "
        f"({summary['images_per_s']} img/s)"
    )
    print(json.dumps(summary))
    return 0


def _remove_temporaries(out: Path, prefix: str) -> None:
    for path in [
        *out.glob(f"{prefix}-*{TMP_SUFFIX}"),
        *out.glob(f"*.json*{TMP_SUFFIX}"),
        *(out / STATE_DIR).glob(f"*{TMP_SUFFIX}"),
    ]:
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
