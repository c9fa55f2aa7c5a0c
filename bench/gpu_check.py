"""One GPU check: the heads' GPU tests, the heads benchmark, the fused kernels compiled, inspected and
timed against their model (python -m bench.kernels --time; then the first configs again with a bf16
dW, figures suffixed _gbf16), the fused head alone at the largest C in its faster modes:
--save-logits (head_saved_C*), then --save-logits --grad-dtype bf16 (head_saved_gbf16_C*), beside
head_bench's fused row, which recomputes the cosines and writes an fp32 dW; then 200 bf16 training
steps of MobileFaceNet and IR-50 at batch 512, the heads at the smaller C, and the DALI loader when
DALI is importable (the stages in this order: the earlier keep their priority for the deadline,
the head's first). Started by bench/gpu_check.sh (`python -m bench.gpu_check` from the repository
root).

Preflight: the packages every stage imports (torch, triton, pytest), then one tiny Triton kernel
launched on the GPU (its first launch builds Triton's launcher with a C compiler and Python.h; a
machine without them would fail every fused stage, so the check stops with one line naming what is
missing). numpy, cv2, yaml and rich are needed only by the data, training and loader stages: without
them those stages are skipped, saying which is missing, and the heads' stages still run.

It prints the machine first (GPU, driver, torch, Triton), ends with the table, and leaves at most
three files in --out, rewritten after every stage so that a run killed midway still returns what it
measured: gpu_check.json (every stage, its figures or why it failed or was skipped), gpu_check.md
(the table), logs.tgz (every stage's output, repacked every few seconds while a stage runs).
Scratch work (synthetic faces, shards, training runs, the raw logs) goes to a temporary folder
outside --out, removed at the end. --deadline (seconds, from the start) bounds the whole run: a
stage that cannot finish in the time left (by its estimate) is skipped and says so; one that runs
over is stopped at the deadline.

Everything it needs is built from the repository, so it runs on a machine with no network. Each
stage runs in its own process; a stage that fails is reported and the others still run. Exit
status: 0 every stage that ran passed, 1 a stage failed, 2 this machine cannot run the check.
--smoke runs the same stages at toy sizes on any device (the CPU included): it checks the script.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# What every stage imports (the heads' stages need no more). Not webdataset: only tests of the shard
# format use it, and the lent GPU machines may lack it (nothing can be installed there).
REQUIRED = ["torch", "triton", "pytest"]
# What the data, training and loader stages import besides: without one of them those stages are
# skipped (saying which is missing) and the heads' stages still run.
DATA_NEEDS = ["numpy", "cv2", "yaml", "rich"]
OUT_FILES = ("gpu_check.json", "gpu_check.md", "logs.tgz")
REPACK_SECONDS = 10.0


@dataclass
class Sizes:
    identities: int = 2000
    images_per_identity: int = 52  # 104,000 images: 200 steps of 512 inside one epoch
    head_classes: tuple[int, ...] = (1_000_000, 100_000, 8631)  # the headline size first
    head_batch: int = 512
    head_dim: int = 512
    head_args: tuple[str, ...] = ()
    loader_batch: int = 512
    loader_images: int = 16384
    train_batch: int = 512
    train_steps: int = 200
    log_every: int = 25
    dtype: str = "bf16"
    # estimated seconds per stage on an H100/H200 class machine, for the deadline
    estimates: dict[str, float] = field(
        default_factory=lambda: {
            "head_tests": 100,
            "head_bench": 60,  # at the first (largest) size; 35 at each other
            "head_bench_more": 35,
            "kernels": 90,  # 16 variants: 2 kernels x 4 configs x 2 modes
            "kernels_gbf16": 20,  # 4 variants: the first configs, dW in bf16
            "data": 90,
            "train": 70,
            "loader_dali": 40,
            "head_mode": 25,  # each of HEAD_MODES: the fused head alone, one margin, at the first size
        }
    )
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
    head_args=("--margins", "arcface", "--repeats", "1", "--warmup", "0"),
    loader_batch=16,
    loader_images=64,
    train_batch=4,  # IR-50 on a CPU: 4 steps of 8 took 30 s of the smoke run, of 4 take 19 s
    train_steps=4,
    log_every=2,
    dtype="fp32",
    estimates={
        "head_tests": 15,
        "head_bench": 20,
        "head_bench_more": 20,
        "kernels": 30,
        "kernels_gbf16": 15,
        "data": 30,
        "train": 40,
        "loader_dali": 20,
        "head_mode": 15,
    },
)


@dataclass
class Stage:
    name: str
    ok: bool
    seconds: float
    figures: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def skipped(self) -> bool:
        return not self.ok and self.note.startswith("skipped")


class CannotRun(Exception):
    """This machine lacks something the check needs; the message names it."""


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _unimportable(names: list[str]) -> list[str]:
    """'name (why)' for each of these modules that does not import."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # an import can fail with more than ImportError (a broken CUDA lib)
            missing.append(f"{name} ({type(err).__name__}: {err})".splitlines()[0])
    return missing


def _python_include() -> Path:
    """Where Triton looks for Python.h (triton/runtime/build.py's choice of scheme)."""
    import sysconfig

    scheme = sysconfig.get_default_scheme()
    return Path(sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"])


def build_tools_missing() -> str | None:
    """What Triton lacks to build its kernel launcher on first launch (a C compiler: $CC, else gcc or
    clang on PATH; Python.h), in a few words; None when both are there."""
    cc = os.environ.get("CC")
    if cc is not None and shutil.which(cc) is None:
        problem = f"no C compiler (CC={cc} is not an executable)"
    elif cc is None and shutil.which("gcc") is None and shutil.which("clang") is None:
        problem = "no C compiler (CC is unset and neither gcc nor clang is on PATH)"
    else:
        problem = None
    header = _python_include() / "Python.h"
    if not header.exists():
        problem = "; ".join(filter(None, [problem, f"no {header} (the python3-dev package)"]))
    return problem


def _launch_tiny_kernel() -> None:
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _add_one(x):
        tl.store(x + tl.arange(0, 16), tl.load(x + tl.arange(0, 16)) + 1.0)

    x = torch.zeros(16, device="cuda")
    _add_one[(1,)](x)
    if x.sum().item() != 16.0:
        raise RuntimeError(f"a tiny Triton kernel ran but wrote {x.tolist()}")


def triton_problem(launch) -> str | None:
    """One line when Triton cannot launch a kernel here, else None. `launch` (None on a CPU): runs
    one tiny kernel, which builds Triton's launcher with the C compiler and Python.h."""
    missing = build_tools_missing()
    if launch is None:
        return f"Triton cannot build its kernel launcher: {missing}" if missing else None
    try:
        launch()
    except Exception as err:
        why = missing or f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        return f"a tiny Triton kernel failed to launch: {why}"
    return None


def preflight(smoke: bool) -> dict[str, Any]:
    """The machine's description, or CannotRun naming the first thing missing."""
    missing = _unimportable(REQUIRED)
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
            driver=_driver(),
            sms=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpus_visible=torch.cuda.device_count(),
            bf16=torch.cuda.is_bf16_supported(),
        )
    problem = triton_problem(_launch_tiny_kernel if env["device"] == "cuda" else None)
    if problem:
        raise CannotRun(problem)
    data_missing = _unimportable(DATA_NEEDS)
    if data_missing:
        env["data_missing"] = "; ".join(data_missing)
    try:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    except Exception as err:
        env["dali"] = None
        env["dali_missing"] = f"{type(err).__name__}: {err}".splitlines()[0]
    return env


def machine_line(env: dict[str, Any]) -> str:
    gpu = (
        f"{env['gpu']} ({env.get('sms')} SMs, {env['gpu_memory_gib']} GiB), driver {env.get('driver')}"
        if env["device"] == "cuda"
        else "no GPU (smoke run on the CPU)"
    )
    return (
        f"machine: {gpu}; torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, "
        f"python {env['python']}, {env['cpus']} CPUs, DALI {env['dali'] or 'not importable'}"
    )


def loader_workers() -> int:
    """Decode workers: all cores but two (the training process and its prefetch thread), at most 12."""
    return max(1, min(12, (os.cpu_count() or 2) - 2))


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


class Check:
    """The run's state: where things go, the deadline, the stages so far; writes --out after each."""

    def __init__(
        self,
        out: Path,
        env: dict[str, Any],
        sizes: Sizes,
        smoke: bool,
        deadline: float,
        started: float | None = None,
    ) -> None:
        self.out, self.env, self.sizes, self.smoke = out, env, sizes, smoke
        self.started = time.monotonic() if started is None else started  # the deadline counts from here
        self.deadline = deadline
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))  # outside --out, always
        self.logs = self.scratch / "logs"
        self.logs.mkdir()
        self.stages: list[Stage] = []
        self.py = sys.executable
        self._lock = threading.Lock()

    def left(self) -> float:
        return self.deadline - (time.monotonic() - self.started)

    def run(self, name: str, cmd: list[str], estimate: float, cap: float = 600) -> tuple[Stage, str]:
        """Run one command as a stage (or skip it if it cannot finish by the deadline); stdout returned."""
        left = self.left() - 3.0  # time to write the results after it
        if left < estimate:
            note = f"skipped: needs ~{estimate:.0f} s, {max(0.0, left):.0f} s left before the --deadline"
            return Stage(name, False, 0.0, note=note), ""
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        )
        log, out = self.logs / f"{name}.log", self.logs / f"{name}.stdout"
        start = time.monotonic()
        with open(log, "w") as err_f, open(out, "w") as out_f:
            err_f.write(f"$ {' '.join(cmd)}\n")
            err_f.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out_f, stderr=err_f, text=True)
            try:
                rc = proc.wait(timeout=min(cap, left))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = None
        seconds = time.monotonic() - start
        stdout = out.read_text(errors="replace")
        if rc is None:
            return Stage(
                name, False, seconds, note=f"timed out after {seconds:.0f} s (cap or --deadline)"
            ), stdout
        if rc != 0:
            text = log.read_text(errors="replace").strip() or stdout.strip()
            return Stage(name, False, seconds, note=f"exit {rc}: {text.splitlines()[-1][:160]}"), stdout
        return Stage(name, True, seconds), stdout

    def add(self, stage: Stage) -> Stage:
        self.stages.append(stage)
        print(
            f"  {stage.name}: {'ok' if stage.ok else stage.note or 'failed'} ({stage.seconds:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        self.save()
        return stage

    def result(self) -> dict[str, Any]:
        skipped = [s.name for s in self.stages if s.skipped]
        failed = [s.name for s in self.stages if not s.ok and not s.skipped]
        stages = [
            {
                "name": s.name,
                "ok": s.ok,
                "seconds": round(s.seconds, 1),
                **s.figures,
                **({"note": s.note} if s.note else {}),
            }
            for s in self.stages
        ]
        return {
            "check": "gpu_check",
            "smoke": self.smoke,
            "environment": self.env,
            "deadline_s": self.deadline,
            "seconds": round(time.monotonic() - self.started, 1),
            "failed": failed,
            "skipped": skipped,
            "stages": stages,
        }

    def save(self) -> None:
        """Rewrite the JSON, the table and the logs archive (each atomically)."""
        from common.fileio import atomic_write_text

        with self._lock:
            atomic_write_text(self.out / "gpu_check.json", json.dumps(self.result(), indent=2) + "\n")
            atomic_write_text(self.out / "gpu_check.md", table(self.env, self.stages))
            self._pack()

    def _pack(self) -> None:
        from common.fileio import atomic_write_bytes

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for path in sorted(self.logs.iterdir()):
                tar.add(path, arcname=f"logs/{path.name}")
        atomic_write_bytes(self.out / "logs.tgz", buf.getvalue())

    def repack_while(self, stop: threading.Event) -> None:
        """Stream the logs: repack logs.tgz every few seconds while stages run."""
        while not stop.wait(REPACK_SECONDS):
            with self._lock:
                self._pack()

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


HIDDEN = ("rows", "floors", "kernels", "variants")  # in the JSON, too long for the table


def table(env: dict[str, Any], stages: list[Stage]) -> str:
    """The Markdown table (also gpu_check.md), the machine line above it."""
    lines = [machine_line(env), "", "| stage | ok | s | figures |", "| --- | --- | --- | --- |"]
    for s in stages:
        figures = ", ".join(f"{k} {v}" for k, v in s.figures.items() if k not in HIDDEN)
        ok = "yes" if s.ok else "skip" if s.skipped else "NO"
        cell = "; ".join(filter(None, [figures, s.note])).replace("|", "/")
        lines.append(f"| {s.name} | {ok} | {s.seconds:.0f} | {cell} |")
    return "\n".join(lines) + "\n"


def stage_head_tests(check: Check) -> Stage:
    import ast

    stage, out = check.run(
        "head_tests",
        [check.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsP", "tests/heads/test_gpu.py"],
        check.sizes.estimates["head_tests"],
        300,
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
    kernels = next((ln.split(":", 1)[1] for ln in out.splitlines() if ln.startswith("kernels:")), None)
    if kernels:  # the tuned configs, registers and spills (tests/heads/test_gpu.py prints them)
        stage.figures["kernels"] = ast.literal_eval(kernels.strip())
        stage.figures["regs/spills"] = " ".join(
            f"{k} {v['n_regs']}/{v['n_spills']}" for k, v in stage.figures["kernels"].items()
        )
    if stage.ok and not check.smoke and "skipped" in summary:
        stage.ok, stage.note = False, "GPU tests were skipped on a machine that has a GPU"
    return stage


def stage_head_bench(check: Check, classes: int) -> Stage:
    sz = check.sizes
    estimate = sz.estimates["head_bench" if classes == sz.head_classes[0] else "head_bench_more"]
    return _run_head_bench(check, f"head_bench_C{classes}", classes, [], estimate)


# The fused head's faster modes, beside head_bench's fused row (which recomputes the cosines in the
# backward and writes an fp32 dW): save_logits, then save_logits with a bf16 dW (weight.grad_dtype).
HEAD_MODES = {"saved": ["--save-logits"], "saved_gbf16": ["--save-logits", "--grad-dtype", "bf16"]}


def stage_head_mode(check: Check, mode: str) -> Stage:
    """python -m bench.heads for the fused head alone at the first (largest) C, first margin, in one of
    HEAD_MODES. Without CUDA (a smoke run) there is no fused head: the saved modes' chunked stand-in
    runs the mode's bf16 dW if any (the flags' path through the script), else the stage is skipped."""
    classes = check.sizes.head_classes[0]
    name, flags = f"head_{mode}_C{classes}", HEAD_MODES[mode]
    if check.env["device"] != "cuda":
        flags = [f for f in flags if f != "--save-logits"]
        if not flags:
            return Stage(name, False, 0.0, note="skipped: --save-logits needs the fused head (CUDA)")
    impl = "fused" if check.env["device"] == "cuda" else "chunked"
    extra = ["--impls", impl, "--margins", "arcface", "--subcenters", "1", *flags]
    return _run_head_bench(check, name, classes, extra, check.sizes.estimates["head_mode"])


def _run_head_bench(check: Check, name: str, classes: int, extra: list[str], estimate: float) -> Stage:
    """One python -m bench.heads run at `classes` (the check's batch, dim and head_args, then `extra`)
    as a stage: per margin and impl its fwd+bwd ms and multiple of the bf16 floor."""
    sz = check.sizes
    cmd = [
        check.py,
        "-m",
        "bench.heads",
        "--classes",
        str(classes),
        "--batch",
        str(sz.head_batch),
        "--dim",
        str(sz.head_dim),
        "--t",
        "1.1",
        "--device",
        check.env["device"],
        *sz.head_args,
        *extra,
    ]
    stage, out = check.run(name, cmd, estimate, 300)
    if not stage.ok:
        return stage
    r = last_json(out)
    figures: dict[str, Any] = {"classes": classes}
    if r.get("save_logits") or r.get("grad_dtype", "fp32") != "fp32":
        figures.update(save_logits=r["save_logits"], grad_dtype=r["grad_dtype"])
    for row in r["rows"]:
        key = f"{row['margin']}_{row['impl']}"
        figures[f"{key}_ms"] = row.get("total_ms", row.get("error"))
        if "x_bf16_floor" in row:
            figures[f"{key}_x_floor"] = row["x_bf16_floor"]
        if "with_step_x_bf16_floor" in row:  # forward, backward and the head's optimizer step
            figures[f"{key}_step_ms"] = row["step_ms"]
            figures[f"{key}_with_step_x_floor"] = row["with_step_x_bf16_floor"]
    for floor in r["floors"]:
        figures.update(
            bf16_floor_ms=floor["bf16_total_ms"],
            bf16_tflops=floor["bf16_tflops"],
            fp32_floor_ms=floor["fp32_total_ms"],
        )
    if "speedup" in r:
        figures[f"{r['impl']}_vs_reference"] = r["speedup"]
    figures.update(rows=r["rows"], floors=r["floors"])
    stage.figures = figures
    return stage


def stage_kernels(check: Check) -> Stage:
    """python -m bench.kernels for this GPU's arch with --time: each kernel variant compiled ahead of
    time (registers, spills, MMA kinds) and launched at the headline shape, the model's predicted
    time per step beside the measured one. Its kernels.md and kernels.json go into logs.tgz. Then a
    cheaper second call, the first configs with a bf16 dW (--grad-dtype bf16), whose step figures
    join the stage's with a _gbf16 suffix (its tables: kernels_gbf16.md/.json in logs.tgz)."""
    import torch

    gpu = check.env["device"] == "cuda"
    # fp16: the operands the fused head uses on CUDA by default; the smoke run (no GPU) compiles
    # the first configs for sm_90 without timing them
    arch = "sm_{}{}".format(*torch.cuda.get_device_capability()) if gpu else "sm_90"
    timing = ["--time"] if gpu else []
    every = [] if gpu else ["--configs", "first"]
    stage, out = _run_kernels(check, "kernels", arch, [*timing, *every])
    if not stage.ok:
        return stage
    stage.figures = _kernel_step_figures(last_json(out)["steps"])
    variants = json.loads((check.scratch / "kernels" / "kernels.json").read_text())["variants"]
    stage.figures["variants"] = variants
    grad, out = _run_kernels(
        check, "kernels_gbf16", arch, [*timing, "--configs", "first", "--grad-dtype", "bf16"]
    )
    stage.seconds += grad.seconds
    if grad.ok:
        stage.figures.update(_kernel_step_figures(last_json(out)["steps"]))
    else:  # a failure fails the stage; a skip (the --deadline) leaves the first call's figures standing
        stage.ok, stage.note = grad.skipped, f"kernels_gbf16 {grad.note}"
    return stage


def _run_kernels(check: Check, name: str, arch: str, extra: list[str]) -> tuple[Stage, str]:
    """python -m bench.kernels for `arch` and fp16 operands (the fused head's default on CUDA), then
    `extra`; its kernels.md and kernels.json copied into the logs as <name>.md and <name>.json."""
    folder = check.scratch / name  # the .ptx and .cubin files stay out of --out
    cmd = [check.py, "-m", "bench.kernels", "--out", str(folder), "--arch", arch, "--dtypes", "fp16", *extra]
    stage, out = check.run(name, cmd, check.sizes.estimates[name], 300)
    for suffix in ("md", "json"):
        if (folder / f"kernels.{suffix}").exists():
            shutil.copy(folder / f"kernels.{suffix}", check.logs / f"{name}.{suffix}")
    return stage, out


def _kernel_step_figures(steps: list[dict]) -> dict[str, Any]:
    """One step summary per arch, dtype and mode (the backward recomputing the cosines, or saved ones;
    the dW dtype when not fp32, as _gbf16), its figures named after them."""
    return {
        f"{k}_{s['arch']}_{s['dtype']}{'_saved' if s.get('save_logits') else ''}"
        f"{'_g' + s['grad'] if s.get('grad', 'fp32') != 'fp32' else ''}": s[k]
        for s in steps
        for k in ("first_ms", "measured_first_ms", "floor_ms", "with_step_first_ms", "measured_step_pass_ms")
        if k in s
    }


def stage_data(check: Check) -> tuple[Stage, Path]:
    sz = check.sizes
    raw, shards = check.scratch / "raw", check.scratch / "shards" / "train"
    if check.env.get("data_missing"):
        note = f"skipped: the data and training stages need {check.env['data_missing']}"
        return Stage("synthetic_data", False, 0.0, note=note), shards
    est = sz.estimates["data"]
    stage, _ = check.run(
        "synthetic_data",
        [
            check.py,
            "preprocess/synthetic.py",
            "--out",
            str(raw),
            "--identities",
            str(sz.identities),
            "--images-per-identity",
            str(sz.images_per_identity),
            "--lfw-identities",
            "20",
            "--seed",
            "0",
        ],
        0.6 * est,
    )
    if not stage.ok:
        return stage, shards
    built, out = check.run(
        "build_shards",
        [
            check.py,
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
        0.4 * est,
    )
    built.seconds += stage.seconds
    if built.ok:
        r = last_json(out)
        built.figures = {
            "samples": r["samples"],
            "classes": r["classes"],
            "build_images_per_s": r["images_per_s"],
        }
    shutil.rmtree(raw, ignore_errors=True)  # the shards are all the later stages read
    return built, shards


def stage_loader(check: Check, shards: Path) -> Stage:
    env, sz = check.env, check.sizes
    if env["dali"] is None:
        return Stage(
            "loader_dali", False, 0.0, note=f"skipped: nvidia.dali is not importable ({env['dali_missing']})"
        )
    device = "cuda" if env["device"] == "cuda" else "cpu"
    workers = loader_workers()
    stage, out = check.run(
        "loader_dali",
        [
            check.py,
            "bench/loader.py",
            "--shards",
            str(shards),
            "--backend",
            "dali",
            "--device",
            device,
            "--batch-size",
            str(sz.loader_batch),
            "--workers",
            str(workers),
            "--images",
            str(sz.loader_images),
        ],
        sz.estimates["loader_dali"],
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


def stage_train(check: Check, shards: Path, samples: int, name: str, config: str) -> Stage:
    sz = check.sizes
    run_dir = check.scratch / f"train_{name}"
    overrides = [
        f"data.train_shards={shards}",
        f"run.dir={run_dir}",
        "run.devices=" + ("[0]" if check.env["device"] == "cuda" else "cpu"),
        f"loader.batch_size={sz.train_batch}",
        f"loader.workers={loader_workers()}",
        f"precision.dtype={sz.dtype}",
        f"schedule.steps={sz.train_steps}",
        "schedule.epochs=0",
        f"schedule.warmup_steps={sz.train_steps // 10}",
        "validation.lfw_shards=null",
        f"checkpoint.every_steps={sz.train_steps * 10}",
        "checkpoint.resume=never",
        f"logging.every_steps={sz.log_every}",
        "logging.display=plain",
        "logging.tensorboard=off",
    ]
    stage, out = check.run(
        f"train_{name}",
        [check.py, "trainer/main.py", "--config", config, *overrides],
        sz.estimates["train"],
        600,
    )
    if not stage.ok:
        return stage
    summary = last_json(out)  # the trainer's summary: steady_* leave out its start-up window
    epoch_steps = samples // sz.train_batch
    stage.figures = {
        "steps": summary["step"],
        "loader": summary.get("loader"),
        "dtype": summary.get("dtype"),
        "images_per_s": round(summary["steady_images_per_s"], 1),
        "data_wait": round(summary["steady_data_wait"], 4),
        "peak_mem_gib": summary.get("peak_mem_gib"),  # logged on CUDA only
        "final_loss": round(summary["loss"], 4) if summary.get("loss") is not None else None,
        "steps_per_epoch": epoch_steps,
    }
    if summary["step"] > epoch_steps:
        stage.note = f"the steady window crosses an epoch boundary ({epoch_steps} steps per epoch)"
    return stage


def run_stages(check: Check) -> None:
    sz = check.sizes
    check.add(stage_head_tests(check))
    check.add(stage_head_bench(check, sz.head_classes[0]))
    check.add(stage_kernels(check))
    for mode in HEAD_MODES:  # the fused head's other modes at the headline size (issue 23's goals)
        check.add(stage_head_mode(check, mode))
    data, shards = stage_data(check)
    check.add(data)
    for name, config in sz.backbones.items():
        if data.ok:
            check.add(stage_train(check, shards, data.figures["samples"], name, config))
        else:
            check.add(Stage(f"train_{name}", False, 0.0, note=f"skipped: no shards (see {data.name})"))
    for classes in sz.head_classes[1:]:
        check.add(stage_head_bench(check, classes))
    if data.ok:
        check.add(stage_loader(check, shards))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_check", help="gets gpu_check.json, gpu_check.md, logs.tgz")
    ap.add_argument(
        "--deadline",
        type=float,
        default=540.0,
        help="seconds for the whole run (default 540); stages that cannot finish are skipped",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="toy sizes on any device: checks the script, not the GPU"
    )
    started = time.monotonic()
    args = ap.parse_args(argv)
    if args.deadline <= 0:
        print("gpu_check: --deadline must be positive", file=sys.stderr)
        return 2
    try:
        env = preflight(args.smoke)
    except CannotRun as err:
        print(f"gpu_check: cannot run here: {err}", file=sys.stderr)
        return 2
    print(machine_line(env), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, env, SMOKE if args.smoke else Sizes(), args.smoke, args.deadline, started)
    stop = threading.Event()
    threading.Thread(target=check.repack_while, args=(stop,), daemon=True).start()
    try:
        run_stages(check)
    finally:
        stop.set()
        check.save()
        check.close()
    result = check.result()
    print(table(env, check.stages), end="")
    print(
        f"{len(check.stages) - len(result['failed']) - len(result['skipped'])}/{len(check.stages)} stages "
        f"passed, {len(result['skipped'])} skipped, in {result['seconds']:.0f} s; results in {out}/"
        f"{{{','.join(OUT_FILES)}}}"
    )
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
