"""The training loop: DDP, autocast, accumulation, clipping, the divergence guard, checkpoints,
validation and logging. `train(cfg, validators, hooks)` is everything `trainer/main.py` runs.

`Trainer` keeps the run's objects and its position (`TrainState`) as attributes; each method does
one part of a run: `setup` (data, model, optimizer), `resume`, `train_step`, `log_window`,
`save_checkpoint`, `validate`, and `fit`, the loop that calls them. The checkpoint dict itself is
built and read by trainer/checkpoint.py.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from common.cli import UserError
from models.backbones import build_backbone
from shards.manifest import load_manifest
from trainer import distributed as dist_util
from trainer import head_parallel
from trainer.checkpoint import (
    CheckpointDir,
    TrainState,
    atomic_save,
    capture_rng,
    check_resumable,
    load_checkpoint,
    restore_rng,
    restore_training,
    training_checkpoint,
    unusable_reason,
)
from trainer.config import TrainConfig, head_kwargs, save_resolved, to_dict
from trainer.hooks import TrainerHooks
from trainer.metrics import MetricsLogger
from trainer.optim import Schedule, build_optimizer
from trainer.validation import Validator


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message says where the checkpoint is."""


class TrainModule(nn.Module):
    """Backbone + margin head in one module: one DDP wrapper syncs both (head.parallel=replicate), or
    the backbone alone is DDP-wrapped inside it (shard; `grad_scale` = world, see head_parallel)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, grad_scale: float = 1.0) -> None:
        super().__init__()
        self.backbone, self.head, self.grad_scale = backbone, head, grad_scale

    def forward(self, images: torch.Tensor, labels: torch.Tensor, autocast: Any) -> torch.Tensor:
        with autocast:
            emb = self.backbone(images)
        # The head's softmax runs in fp32 whatever the backbone's precision.
        with torch.autocast(images.device.type, enabled=False):
            return self.head(head_parallel.scale_grad(emb.float(), self.grad_scale), labels)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if name == "fp16" and device.type != "cuda":
        raise UserError("precision.dtype=fp16 needs a GPU (use bf16 or fp32 on the CPU)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]


def check_head_impl(impl: str, device: torch.device) -> None:
    """head.impl=fused needs Triton and a CUDA device (or the Triton interpreter): one line, not a
    traceback from inside the head at the first step."""
    if impl != "fused":
        return
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(f"head.impl=fused needs a CUDA GPU (this run is on {device}); "
                        "use head.impl=chunked or auto")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise UserError("head.impl=fused needs triton, which is not installed; "
                        "use head.impl=chunked") from None


def build_loader(cfg: TrainConfig, info: dist_util.DistInfo) -> tuple[Any, int, tuple[int, int]]:
    """(loader, num_classes, image_size) for the configured data source."""
    if cfg.data.source == "synthetic":
        from trainer.synthetic import SyntheticLoader

        size = (int(cfg.data.synthetic_image_size[0]), int(cfg.data.synthetic_image_size[1]))
        loader = SyntheticLoader(
            cfg.data.synthetic_classes, cfg.data.synthetic_per_class, size, batch_size=cfg.loader.batch_size,
            rank=info.rank, world_size=info.world_size, seed=cfg.run.seed, device=info.device,
            channels_last=cfg.model.channels_last, noise=cfg.data.synthetic_noise,
        )
        return loader, cfg.data.synthetic_classes, size
    manifest = load_manifest(cfg.data.train_shards, verify=cfg.data.verify)  # the user's error first
    from shards.loader import build_train_loader

    loader = build_train_loader(
        manifest, batch_size=cfg.loader.batch_size, rank=info.rank, world_size=info.world_size,
        seed=cfg.run.seed, backend=cfg.loader.backend, device=info.device, workers=cfg.loader.workers,
        augment=cfg.data.augment, channels_last=cfg.model.channels_last, prefetch=cfg.loader.prefetch,
        persistent_workers=cfg.loader.persistent_workers, source_workers=cfg.loader.source_workers,
    )
    return loader, manifest.num_classes, (int(manifest.image_size[0]), int(manifest.image_size[1]))


@dataclass
class Window:
    """Sums over a stretch of steps, for a log record's rates (and the run's steady rate)."""

    loss: float = 0.0
    n: int = 0          # finite steps (the loss average is over these)
    wait: float = 0.0   # seconds waiting for data
    time: float = 0.0   # seconds of whole steps
    images: int = 0

    def add(self, other: Window) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def rates(self) -> tuple[float | None, float | None]:
        """(images per second, fraction of the time spent waiting for data)."""
        if not self.time:
            return None, None
        return self.images / self.time, self.wait / self.time


@dataclass
class StepResult:
    finite: bool
    loss: torch.Tensor  # 0-d, on the device: read only when logged
    lr: float           # the LR this step ran with
    wait: float
    seconds: float


class Trainer:
    """One training run (this process's part of it). `fit()` runs it and returns the summary."""

    def __init__(self, cfg: TrainConfig, info: dist_util.DistInfo, validators: Sequence[Validator] = (),
                 hooks: TrainerHooks | None = None) -> None:
        self.cfg, self.info = cfg, info
        self.validators = list(validators)
        self.hooks = hooks or TrainerHooks()
        self.run_dir = Path(cfg.run.dir)
        self.ckdir = CheckpointDir(self.run_dir / "checkpoints", cfg.checkpoint.keep_last)
        self.state = TrainState()
        self.last_val: dict[str, Any] = {}
        self.nonfinite_run = 0

    # ---- set-up ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Seeds, data, model, optimizer, schedule and scaler: everything before the resume."""
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.run.seed + info.rank)
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.run.deterministic
            torch.backends.cudnn.deterministic = cfg.run.deterministic
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        check_head_impl(cfg.head.impl, info.device)
        self.loader, self.num_classes, image_size = build_loader(cfg, info)
        if self.loader.batches_per_epoch < cfg.optim.accumulate:
            raise UserError(f"{cfg.data.train_shards or 'data'}: {self.loader.batches_per_epoch} batches "
                            f"per epoch per process at loader.batch_size={cfg.loader.batch_size}: "
                            "too few samples")
        self.steps_per_epoch = self.loader.batches_per_epoch // cfg.optim.accumulate
        self.total = cfg.schedule.steps or max(1, math.ceil(cfg.schedule.epochs * self.steps_per_epoch))
        self.spec = {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size,
                     "image_size": list(image_size), "kwargs": dict(cfg.model.kwargs)}
        self.backbone = self._build_backbone(image_size)
        self.parallel = head_parallel.resolve_parallel(cfg.head.parallel, info.world_size)
        self.head = head_parallel.build_head(self.parallel, self.num_classes, cfg.model.embedding_size,
                                             head_kwargs(cfg.head), cfg.head.sample_rate, cfg.run.seed)
        self.module = TrainModule(self.backbone, self.head).to(info.device)
        if cfg.model.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.backbone, self.head, cfg.optim)
        self.head_state = head_parallel.HeadState(self.head, self.optimizer)
        self.schedule = Schedule(self.optimizer, cfg.optim.lr, self.total, cfg.schedule)
        self.dtype = resolve_dtype(cfg.precision.dtype, info.device)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.dtype == torch.float16)
        self.autocast = torch.autocast(info.device.type, dtype=self.dtype or torch.float32,
                                       enabled=self.dtype is not None)

    def _build_backbone(self, image_size: tuple[int, int]) -> nn.Module:
        m = self.cfg.model
        try:
            return build_backbone(m.backbone, m.embedding_size, image_size, **m.kwargs)
        except (TypeError, ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"model.kwargs={m.kwargs}: cannot build backbone {m.backbone!r} "
                            f"({first})") from None

    @property
    def parts(self) -> dict[str, Any]:
        """The components whose states a training checkpoint holds besides the backbone's."""
        return {"head_state": self.head_state,
                "optimizer": head_parallel.OptimizerState(self.optimizer, self.head),
                "scaler": self.scaler, "scheduler": self.schedule}

    def resume(self) -> Path | None:
        """Continue from a checkpoint as `checkpoint.resume` says; returns the file resumed from."""
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None
        if mode == "auto":
            if self.info.is_main:
                self.ckdir.clean_partial()
            found = self.ckdir.newest_complete()
        else:
            found = (Path(mode), load_checkpoint(mode))
            reason = unusable_reason(found[1])
            if reason is not None:
                raise UserError(f"checkpoint.resume={mode}: cannot resume: {reason} (pick an earlier "
                                "checkpoint, or checkpoint.resume=auto for the newest usable one)")
        if found is None:
            return None
        path, ckpt = found
        check_resumable(path, ckpt, self.spec, self.num_classes, self.cfg.loader.batch_size,
                        self.info.world_size)
        self.state = restore_training(ckpt, self.backbone, self.parts)
        ranks = ckpt["rng"].get("per_rank", [])
        if len(ranks) == self.info.world_size:  # the same process count: each rank's own streams
            restore_rng(ranks[self.info.rank])
        else:
            torch.manual_seed(self.cfg.run.seed + self.info.rank + 7919 * self.state.step)
        return path

    def _wrap(self) -> nn.Module:
        """The module the steps call: the backbone compiled and DDP-wrapped as configured. Sets
        `self.ddp` (the DDP wrapper, for no_sync) when there are several processes: around backbone
        and head (replicate) or around the backbone alone (shard: the head's gradients are never
        all-reduced)."""
        shard = self.parallel == "shard" and self.info.enabled
        if self.cfg.model.compile:
            # The backbone alone, in place (its state_dict keys stay as they are). The head stays
            # eager: its autograd Function and Python-int step would be graph breaks and guards.
            backend = self.cfg.model.compile_backend
            if backend not in torch._dynamo.list_backends(exclude_tags=()):
                raise UserError(f"model.compile_backend={backend!r}: not a torch.compile backend here "
                                f"(inductor, cudagraphs, aot_eager, eager, ...)")
            self.backbone.compile(backend=backend)
        inner: nn.Module = self.backbone if shard else self.module
        self.ddp: DDP | None = None
        if self.info.enabled:
            ids = [self.info.device.index] if self.info.device.type == "cuda" else None
            inner = self.ddp = DDP(inner, device_ids=ids, gradient_as_bucket_view=True)
        if shard:
            return TrainModule(inner, self.head, grad_scale=float(self.info.world_size))
        return inner

    # ---- one step ------------------------------------------------------------------------------

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self.batches)
        except StopIteration:
            self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0
            self.loader.set_epoch(self.state.epoch)
            self.batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(self.loader)
            return next(self.batches)

    def train_step(self) -> StepResult:
        """Forward/backward over `optim.accumulate` micro-batches, then the guarded optimizer step."""
        cfg, st = self.cfg, self.state
        t_step, wait = time.perf_counter(), 0.0
        step_loss = torch.zeros((), device=self.info.device)
        for micro in range(cfg.optim.accumulate):
            t_wait = time.perf_counter()
            images, labels = self._next_batch()
            wait += time.perf_counter() - t_wait
            st.batch_in_epoch += 1
            sync = micro == cfg.optim.accumulate - 1 or not self.info.enabled
            with nullcontext() if sync or self.ddp is None else self.ddp.no_sync():
                loss = self.hooks.micro_batch_loss(st.step, self.model(images, labels, self.autocast))
                self.scaler.scale(loss / cfg.optim.accumulate).backward()
            step_loss += loss.detach().float() / cfg.optim.accumulate
        self.hooks.after_backward(st.step)
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else float("inf")
        grad_norm = head_parallel.clip_grad_norm(self.backbone_params, self.head_params, max_norm,
                                                 self.parallel == "shard" and self.info.enabled)
        # One host sync per step for the guard; DDP has averaged the gradients (and a sharded head's
        # norm is summed over the ranks), so every rank sees the same norm, and the loss flag is
        # reduced so all ranks skip together.
        # (fp16: the scaler itself skips steps with inf gradients while it calibrates.)
        grads_ok = self.scaler.is_enabled() or bool(torch.isfinite(grad_norm))
        finite = dist_util.all_true(bool(torch.isfinite(step_loss)) and grads_ok, self.info)
        if finite:
            # Partial FC: only the sampled centres (and their optimizer state) step
            head_parallel.optimizer_step(self.optimizer, self.head, lambda: self.scaler.step(self.optimizer))
            self.nonfinite_run = 0
        else:
            st.skipped_total += 1
            self.nonfinite_run += 1
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        st.step += 1
        lr = self.schedule.lr
        self.schedule.advance()
        self.head.set_step(st.step)
        return StepResult(finite, step_loss, lr, wait, time.perf_counter() - t_step)

    # ---- logging, validation, checkpoints ---------------------------------------------------------

    def log_window(self, lr: float) -> None:
        """One metrics.jsonl record for the steps since the last one; the window starts afresh."""
        st, w = self.state, self.window
        acc = self.head.last_accuracy
        images_per_s, data_wait = w.rates()
        record = {
            "step": st.step,
            "epoch": round(st.epoch + st.batch_in_epoch / max(1, self.loader.batches_per_epoch), 4),
            "loss": w.loss / w.n if w.n else None, "batch_acc": None if acc is None else float(acc), "lr": lr,
            "images_per_s": images_per_s, "data_wait": data_wait,
            "skipped_total": st.skipped_total, "eta_s": round(self.log.eta_s(st.step), 1),
        }
        if self.info.device.type == "cuda":
            record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.info.device) / 2**30, 3)
        self.log.log(record)
        self.summary.update(record)
        # The run's throughput for the summary: every log window but the first, which holds start-up
        # (worker spawn, cuDNN autotuning, Triton compilation); the first alone in a run that short.
        if self.first_window is None:
            self.first_window = w
        else:
            self.steady.add(w)
        self.window = Window()

    def validate(self) -> dict[str, Any]:
        """Every validator on rank 0; the first one's accuracy is broadcast (it picks best.pt)."""
        res: dict[str, Any] = {}
        if self.info.is_main:
            t = time.perf_counter()
            backbone = self.backbone
            for i, validator in enumerate(self.validators):
                metrics = validator(backbone)
                res.update(metrics if i == 0 else {f"{validator.name}_{k}": v for k, v in metrics.items()})
            res["val_seconds"] = time.perf_counter() - t
        acc = dist_util.broadcast_float(float(res.get("accuracy_mean", -1.0)), self.info)
        return {"val_accuracy": acc, **{k: v for k, v in res.items() if k != "accuracy_mean"}}

    def save_checkpoint(self, best_now: bool, metrics: dict[str, Any], name: str | None = None) -> None:
        """A step checkpoint (with last.pt and, if `best_now`, best.pt), or the file `name`. Every rank
        calls it: each one's RNG state goes in."""
        rngs = dist_util.gather_objects(capture_rng(), self.info)
        self.head_state.gather()  # a sharded head's rows come to rank 0
        if not self.info.is_main:
            return
        ckpt = training_checkpoint(self.spec, self.backbone, self.parts, self.state, rngs,
                                   to_dict(self.cfg), metrics)
        if name is not None:
            atomic_save(ckpt, self.ckdir.root / name)
            return
        step = self.state.step
        self.ckdir.save(ckpt, step, best=best_now,
                        on_written=lambda f: self.hooks.checkpoint_written(step, f))

    # ---- the loop --------------------------------------------------------------------------------

    def _start(self) -> None:
        """After setup and resume: save the config, wrap the model, open the log, start the data."""
        cfg, info = self.cfg, self.info
        resumed_from = self.resume()
        if info.is_main:
            save_resolved(cfg, self.run_dir / "config.yaml")
        self.model = self._wrap()
        self.head_params = [p for p in self.head.parameters() if p.requires_grad]
        self.backbone_params = [p for p in self.backbone.parameters() if p.requires_grad]
        self.log = MetricsLogger(self.run_dir, self.total, self.state.step, cfg.logging.display,
                                 cfg.logging.tensorboard, info.is_main)
        backend = getattr(self.loader, "backend", cfg.data.source)
        if resumed_from is not None:
            self.log.message(f"resumed from {resumed_from} at step {self.state.step}")
        if self.log.dropped:
            self.log.message(f"metrics.jsonl: dropped {self.log.dropped} record(s) of steps after "
                             f"{self.state.step}, which this run repeats")
        self.log.message(
            f"training {cfg.model.backbone} on {self.num_classes} classes, {info.world_size} process(es) on "
            f"{info.device}, {self.dtype or 'fp32'}, {self.total} steps, {self.steps_per_epoch} steps/epoch, "
            f"global batch {cfg.loader.batch_size * info.world_size * cfg.optim.accumulate}, "
            f"{backend} loader")
        self.log.message(head_parallel.describe(self.head, self.parallel, self.optimizer,
                                                cfg.loader.batch_size, info.world_size, info.backend))
        if cfg.checkpoint.save_untrained and self.state.step == 0:
            self.save_checkpoint(False, {}, name="untrained.pt")
        self.window, self.steady, self.first_window = Window(), Window(), None
        self.summary: dict[str, Any] = {
            "loader": backend, "dtype": str(self.dtype).removeprefix("torch.") if self.dtype else "float32"}
        self.model.train()
        self.loader.set_epoch(self.state.epoch, start_batch=self.state.batch_in_epoch)
        self.batches = iter(self.loader)

    def _after_step(self, res: StepResult) -> None:
        """Account the step; then the guard, validation, the log record and the checkpoint, as due."""
        cfg, st = self.cfg, self.state
        if res.finite:
            self.window.loss += float(res.loss)
            self.window.n += 1
        self.window.add(Window(wait=res.wait, time=res.seconds,
                               images=cfg.loader.batch_size * cfg.optim.accumulate * self.info.world_size))
        if self.nonfinite_run >= cfg.optim.max_nonfinite_in_row:
            self._diverged(f"{self.nonfinite_run} non-finite steps in a row at step {st.step}")
        last = st.step == self.total
        val_due = bool(self.validators) and (st.step % cfg.validation.every_steps == 0 or last)
        if val_due:
            self.last_val = self.validate()
        if st.step % cfg.logging.every_steps == 0 or st.step == self.total:
            self.log_window(res.lr)
        if val_due:
            self.log.log({"step": st.step, **self.last_val})
        improved = val_due and self.last_val.get("val_accuracy", -1.0) > st.best_accuracy
        if improved:
            st.best_accuracy = self.last_val["val_accuracy"]
        # Never after a skipped (non-finite) step: a checkpoint is a state a resume may continue from.
        due = st.step % cfg.checkpoint.every_steps == 0 or st.step == self.total or improved
        if due and res.finite:
            # A finite step can still overflow the weights (a huge LR); all ranks decide together.
            if not dist_util.all_true(self._state_finite(), self.info):
                self._diverged(f"weights or optimizer state NaN or infinite after step {st.step}")
            self.save_checkpoint(improved, self.last_val)

    def _state_finite(self) -> bool:
        """Every parameter, buffer (BN statistics) and optimizer-state tensor finite (one host sync)."""
        tensors = list(self.module.parameters()) + list(self.module.buffers()) + [
            v for state in self.optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors if t.is_floating_point()]).all())

    def _diverged(self, what: str) -> None:
        """Save the state for inspection under a name no resume picks up, and stop with one line."""
        st = self.state
        name = f"diverged-step-{st.step:08d}.pt"
        self.save_checkpoint(False, {"diverged": True}, name=name)
        files = self.ckdir.step_files()
        restart = f"{files[-1][1].name}, the newest checkpoint before it" if files else "step 0"
        raise TrainingDiverged(
            f"training diverged: {what} ({st.skipped_total} skipped in total); state saved to "
            f"{self.ckdir.root / name} (never resumed from: checkpoint.resume=auto restarts from "
            f"{restart}); lower optim.lr, raise schedule.warmup_steps or set optim.clip_grad_norm")

    def fit(self) -> dict[str, Any]:
        """Set up, resume, run the remaining steps; returns the summary (rank 0's view)."""
        self.setup()
        self._start()
        try:
            while self.state.step < self.total:
                self._after_step(self.train_step())
            if self.nonfinite_run:  # the final state is not a trained model: no "done", no exit 0
                self._diverged(f"the run ended on {self.nonfinite_run} non-finite step(s) in a row")
            self.hooks.finished(self)
            return self._summary()
        finally:
            self.log.close()
            getattr(self.loader, "close", lambda: None)()  # persistent reader workers end with the run

    def _summary(self) -> dict[str, Any]:
        st = self.state
        self.summary.update({"step": st.step, "best_accuracy": st.best_accuracy,
                             "skipped_total": st.skipped_total, **self.last_val})
        run_rate = self.steady if self.steady.time or self.first_window is None else self.first_window
        if run_rate.time:
            self.summary["steady_images_per_s"], self.summary["steady_data_wait"] = run_rate.rates()
        if self.info.is_main:
            print(f"done: {st.step} steps; checkpoints in {self.ckdir.root}", file=sys.stderr)
        return self.summary


def train(cfg: TrainConfig, validators: Sequence[Validator] = (),
          hooks: TrainerHooks | None = None) -> dict[str, Any]:
    """Run (or continue) the configured training. Returns the final summary (rank 0's view)."""
    info = dist_util.setup(cfg.run.devices, cfg.run.collective_timeout_s)
    finished = False
    try:
        summary = Trainer(cfg, info, validators, hooks).fit()
        finished = True
        return summary
    except RuntimeError as err:
        lost = dist_util.peer_lost(err, info, cfg.run.collective_timeout_s)
        if lost is not None:
            raise lost from None
        raise
    finally:
        # The trainer (model, optimizer, DDP buckets) is gone here; collect it before the group dies.
        dist_util.teardown(info, sync=finished)
