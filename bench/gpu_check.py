"""One GPU check: the heads' GPU tests, the heads and loader benchmarks, and 200 bf16 training steps
of MobileFaceNet and IR-50, as a table on stdout and JSON in --out. Started by bench/gpu_check.sh.

Everything it needs is built from the repository (synthetic faces -> shards), so it runs on a
machine with no network. Each stage runs in its own process with a time limit; a stage that fails
is reported in the table and the others still run. Exit status: 0 all stages passed, 1 a stage
failed, 2 this machine cannot run the check (the line says what is missing).

--smoke runs the same stages at toy sizes on whatever device there is (the CPU included): it checks
the script itself, not the GPU, and its figures mean nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# What the stages import. Not webdataset: only tests of the shard format use it, and the lent GPU
# machines may lack it (nothing can be installed there).
REQUIRED = ["torch", "triton", "numpy", "cv2", "yaml", "rich", "pytest"]


@dataclass
class Sizes:
    identities: int = 1000
    images_per_identity: int = 24
    head_classes: tuple[int, ...] = (8631, 100_000, 1_000_000)
    head_batch: int = 512
    head_dim: int = 512
    loader_batch: int = 512
    loader_images: int = 16384
    train_batch: int = 512
    train_steps: int = 200
    log_every: int = 50
    dtype: str = "bf16"
    backbones: dict[str, str] = field(
        default_factory=lambda: {
            "mobilefacenet": "configs/mobilefacenet_cosface_vggface2.yaml",
            "ir50": "configs/ir50_arcface_vggface2.yaml",
        }
    )


SMOKE = Sizes(
    identities=20,
    images_per_identity=8,
    head_classes=(1000,),
    head_batch=32,
    head_dim=64,
    loader_batch=16,
    loader_images=64,
    train_batch=8,
    train_steps=4,
    log_every=2,
    dtype="fp32",
)


@dataclass
class Stage:
    name: str
    ok: bool
    seconds: float
    figures: dict[str, Any] = field(default_factory=dict)
    note: str = ""


class CannotRun(Exception):
    """This machine lacks something the check needs; the message names it."""


def preflight(smoke: bool) -> dict[str, Any]:
    """The machine's description, or CannotRun naming the first thing missing."""
    missing = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except Exception as err:  # an import can fail with more than ImportError (a broken CUDA lib)
            missing.append(f"{name} ({type(err).__name__}: {err})".splitlines()[0])
    if missing:
        raise CannotRun(f"missing Python packages: {'; '.join(missing)} (install requirements/gpu.txt)")
    import torch
    import triton

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "cpus": os.cpu_count(),
    }
    if not torch.cuda.is_available():
        if not smoke:
            why = (
                "torch was built without CUDA"
                if torch.version.cuda is None
                else "no visible device or driver"
            )
            raise CannotRun(
                f"no CUDA GPU: torch.cuda.is_available() is False ({why}; torch {torch.__version__})"
            )
        env["device"] = "cpu"
    else:
        props = torch.cuda.get_device_properties(0)
        env.update(
            device="cuda",
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpus_visible=torch.cuda.device_count(),
            bf16=torch.cuda.is_bf16_supported(),
        )
    try:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    except Exception as err:
        env["dali"] = None
        env["dali_missing"] = f"{type(err).__name__}: {err}".splitlines()[0]
    return env


def loader_workers() -> int:
    """Decode workers: all cores but two (the training process and its prefetch thread), at most 12."""
    return max(1, min(12, (os.cpu_count() or 2) - 2))


def run_stage(name: str, cmd: list[str], log_dir: Path, timeout: float) -> tuple[Stage, str]:
    """Run one command; its stdout and stderr go to log_dir/<name>.log. Returns the stage and stdout."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    start = time.perf_counter()
    log = log_dir / f"{name}.log"
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        log.write_text(f"$ {' '.join(cmd)}\n{err.stdout or ''}\n{err.stderr or ''}")
        return Stage(name, False, time.perf_counter() - start, note=f"timed out after {timeout:.0f} s"), ""
    seconds = time.perf_counter() - start
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or [""]
        return Stage(
            name, False, seconds, note=f"exit {proc.returncode}: {tail[0][:160]} (log: {log})"
        ), proc.stdout
    return Stage(name, True, seconds), proc.stdout


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def stage_head_tests(py: str, log_dir: Path, smoke: bool) -> Stage:
    stage, out = run_stage(
        "head_tests",
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_heads_gpu.py"],
        log_dir,
        600,
    )
    summary = next(
        (
            ln
            for ln in reversed(out.splitlines())
            if " in " in ln and ("passed" in ln or "failed" in ln or "skipped" in ln)
        ),
        "",
    )
    stage.figures["pytest"] = summary.strip("= ")
    if stage.ok and not smoke and "skipped" in summary:
        stage.ok, stage.note = False, "GPU tests were skipped on a machine that has a GPU"
    return stage


def stage_head_bench(py: str, log_dir: Path, sizes: Sizes, device: str) -> list[Stage]:
    stages = []
    for classes in sizes.head_classes:
        stage, out = run_stage(
            f"head_bench_C{classes}",
            [
                py,
                "bench/heads.py",
                "--impl",
                "fused" if device == "cuda" else "chunked",
                "--margin",
                "arcface",
                "--batch",
                str(sizes.head_batch),
                "--dim",
                str(sizes.head_dim),
                "--classes",
                str(classes),
                "--device",
                device,
            ],
            log_dir,
            300,
        )
        if stage.ok:
            r = last_json(out)
            stage.figures = {
                "classes": classes,
                "ms": round(r["seconds"] * 1e3, 2),
                "reference_ms": round(r["baseline_seconds"] * 1e3, 2),
                "working_mib": round(r["working_bytes"] / 2**20, 1),
                "reference_working_mib": round(r["baseline_working_bytes"] / 2**20, 1),
            }
            if "floor_seconds" in r:
                stage.figures.update(
                    floor_ms=round(r["floor_seconds"] * 1e3, 2), x_floor=round(r["floor_ratio"], 2)
                )
        stages.append(stage)
    return stages


def stage_data(py: str, log_dir: Path, work: Path, sizes: Sizes) -> tuple[Stage, Path]:
    raw, shards = work / "raw", work / "shards" / "train"
    stage, _ = run_stage(
        "synthetic_data",
        [
            py,
            "preprocess/synthetic.py",
            "--out",
            str(raw),
            "--identities",
            str(sizes.identities),
            "--images-per-identity",
            str(sizes.images_per_identity),
            "--lfw-identities",
            "20",
            "--seed",
            "0",
        ],
        log_dir,
        600,
    )
    if not stage.ok:
        return stage, shards
    built, out = run_stage(
        "build_shards",
        [
            py,
            "preprocess/build_shards.py",
            "vggface2",
            "--root",
            str(raw / "vggface2"),
            "--split",
            "train",
            "--out",
            str(shards),
            "--overwrite",
        ],
        log_dir,
        600,
    )
    built.seconds += stage.seconds
    if built.ok:
        r = last_json(out)
        built.figures = {
            "samples": r["samples"],
            "classes": r["classes"],
            "build_images_per_s": r["images_per_s"],
        }
    return built, shards


def stage_loader(py: str, log_dir: Path, shards: Path, sizes: Sizes, env: dict[str, Any]) -> Stage:
    if env["dali"] is None:
        return Stage(
            "loader_dali", False, 0.0, note=f"skipped: nvidia.dali is not importable ({env['dali_missing']})"
        )
    device = "cuda" if env["device"] == "cuda" else "cpu"
    workers = loader_workers()
    stage, out = run_stage(
        "loader_dali",
        [
            py,
            "bench/loader.py",
            "--shards",
            str(shards),
            "--backend",
            "dali",
            "--device",
            device,
            "--batch-size",
            str(sizes.loader_batch),
            "--workers",
            str(workers),
            "--images",
            str(sizes.loader_images),
        ],
        log_dir,
        300,
    )
    if stage.ok:
        r = last_json(out)
        stage.figures = {
            "decode": "mixed (nvJPEG)" if device == "cuda" else "cpu",
            "workers": workers,
            "images_per_s": r["images_per_s"],
            "baseline_images_per_s": r["baseline_images_per_s"],
            "ratio": r["ratio"],
        }
    return stage


def stage_train(
    py: str,
    log_dir: Path,
    work: Path,
    shards: Path,
    sizes: Sizes,
    env: dict[str, Any],
    name: str,
    config: str,
) -> Stage:
    run_dir = work / f"train_{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    workers = loader_workers()
    overrides = [
        f"data.train_shards={shards}",
        f"run.dir={run_dir}",
        "run.devices=" + ("[0]" if env["device"] == "cuda" else "cpu"),
        f"loader.batch_size={sizes.train_batch}",
        f"loader.workers={workers}",
        f"precision.dtype={sizes.dtype}",
        f"schedule.steps={sizes.train_steps}",
        "schedule.epochs=0",
        f"schedule.warmup_steps={sizes.train_steps // 10}",
        "validation.lfw_shards=null",
        f"checkpoint.every_steps={sizes.train_steps * 10}",
        "checkpoint.resume=never",
        f"logging.every_steps={sizes.log_every}",
        "logging.display=plain",
        "logging.tensorboard=off",
    ]
    stage, out = run_stage(
        f"train_{name}", [py, "trainer/main.py", "--config", config, *overrides], log_dir, 600
    )
    if not stage.ok:
        return stage
    summary = last_json(out)  # the trainer's summary: steady_* leave out its start-up window
    stage.figures = {
        "steps": summary["step"],
        "loader": summary.get("loader"),
        "dtype": summary.get("dtype"),
        "images_per_s": round(summary["steady_images_per_s"], 1),
        "data_wait": round(summary["steady_data_wait"], 4),
        "peak_mem_gib": summary.get("peak_mem_gib"),  # logged on CUDA only
        "final_loss": round(summary["loss"], 4) if summary.get("loss") is not None else None,
    }
    return stage


def show(env: dict[str, Any], stages: list[Stage]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    title = (
        f"gpu_check on {env.get('gpu', 'CPU (smoke)')}, torch {env['torch']}, triton {env['triton']}, "
        f"DALI {env['dali'] or 'not installed'}"
    )
    table = Table(title=title, box=box.MARKDOWN)
    for col in ("stage", "ok", "s", "figures"):
        table.add_column(col)
    for s in stages:
        figures = ", ".join(f"{k} {v}" for k, v in s.figures.items())
        ok = "yes" if s.ok else "skip" if s.note.startswith("skipped") else "NO"
        table.add_row(s.name, ok, f"{s.seconds:.0f}", "; ".join(filter(None, [figures, s.note])))
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", default="runs/gpu_check", help="folder for gpu_check.json, logs and the synthetic data"
    )
    ap.add_argument(
        "--smoke", action="store_true", help="toy sizes on any device: checks the script, not the GPU"
    )
    args = ap.parse_args(argv)
    try:
        env = preflight(args.smoke)
    except CannotRun as err:
        print(f"gpu_check: cannot run here: {err}", file=sys.stderr)
        return 2
    sizes = SMOKE if args.smoke else Sizes()
    out = Path(args.out)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    started = time.perf_counter()

    stages = [stage_head_tests(py, log_dir, args.smoke)]
    stages += stage_head_bench(py, log_dir, sizes, env["device"])
    data, shards = stage_data(py, log_dir, out / "work", sizes)
    stages.append(data)
    if data.ok:
        stages.append(stage_loader(py, log_dir, shards, sizes, env))
        for name, config in sizes.backbones.items():
            stages.append(stage_train(py, log_dir, out / "work", shards, sizes, env, name, config))
    show(env, stages)
    total = time.perf_counter() - started
    # A missing DALI is reported, not a failure: the torch loader serves then.
    skipped = [s.name for s in stages if not s.ok and s.note.startswith("skipped")]
    failed = [s.name for s in stages if not s.ok and s.name not in skipped]
    result = {
        "check": "gpu_check",
        "smoke": args.smoke,
        "environment": env,
        "seconds": round(total, 1),
        "failed": failed,
        "skipped": skipped,
        "stages": [
            {
                "name": s.name,
                "ok": s.ok,
                "seconds": round(s.seconds, 1),
                **s.figures,
                **({"note": s.note} if s.note else {}),
            }
            for s in stages
        ],
    }
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{len(stages) - len(failed) - len(skipped)}/{len(stages)} stages passed, {len(skipped)} skipped, "
        f"in {total:.0f} s; "
        f"JSON: {out / 'gpu_check.json'}, logs: {log_dir}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
