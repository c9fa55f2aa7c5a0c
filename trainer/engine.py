"""The training loop: DDP, autocast, accumulation, clipping, the divergence guard, checkpoints,
validation and logging. `train(cfg, validators, hooks)` is everything `trainer/main.py` runs.

A `Trainer` is built in one go, in `__init__`: `build_parts` makes what the run trains with
(`RunParts`: data, backbone, head, optimizer, schedule, scaler, precision), `resume` brings them to a
checkpoint's state and returns the run's position (`TrainState`, what changes each step), and
`wrap_for_training` makes the module the steps call (compiled and DDP-wrapped as configured). The
methods then each do one part of a run: `train_step`, `log_window`, `validate`, `save_checkpoint`, and
`fit`, the loop that calls them. The checkpoint dict itself is built and read by trainer/checkpoint.py.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
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
from trainer.config import TrainConfig, head_kwargs, recipe_warnings, save_resolved, to_dict
from trainer.distill import Teacher, check_same_teacher, distill_loss
from trainer.hooks import FinishedRun, TrainerHooks
from trainer.init_from import init_backbone
from trainer.metrics import MetricsLogger
from trainer.optim import Schedule, build_optimizer
from trainer.validation import Validator


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message says where the checkpoint is."""


class BackboneAndHead(nn.Module):
    """Backbone + margin head in one module, its forward (the margin loss, the embeddings): one DDP
    wrapper syncs both (head.parallel=replicate), or the backbone alone is DDP-wrapped inside it
    (shard; `grad_scale` = world, see head_parallel). The embeddings are for the distillation term,
    whose gradient is not scaled: it is each rank's own mean, which DDP's average makes global."""

    def __init__(self, backbone: nn.Module, head: nn.Module, grad_scale: float = 1.0) -> None:
        super().__init__()
        self.backbone, self.head, self.grad_scale = backbone, head, grad_scale

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, autocast: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast:
            emb = self.backbone(images)
        # The head's softmax runs in fp32 whatever the backbone's precision.
        with torch.autocast(images.device.type, enabled=False):
            return self.head(head_parallel.scale_grad(emb.float(), self.grad_scale), labels), emb


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
        raise UserError(
            f"head.impl=fused needs a CUDA GPU (this run is on {device}); use head.impl=chunked or auto"
        )
    try:
        import triton  # noqa: F401
    except ImportError:
        raise UserError(
            "head.impl=fused needs triton, which is not installed; use head.impl=chunked"
        ) from None


def build_loader(cfg: TrainConfig, info: dist_util.DistInfo) -> tuple[Any, int, tuple[int, int]]:
    """(loader, num_classes, image_size) for the configured data source."""
    if cfg.data.source == "synthetic":
        from trainer.synthetic import SyntheticLoader

        size = (int(cfg.data.synthetic.image_size[0]), int(cfg.data.synthetic.image_size[1]))
        loader = SyntheticLoader(
            cfg.data.synthetic.classes,
            cfg.data.synthetic.per_class,
            size,
            batch_size=cfg.loader.batch_size,
            rank=info.rank,
            world_size=info.world_size,
            seed=cfg.run.seed,
            device=info.device,
            channels_last=cfg.model.channels_last,
            noise=cfg.data.synthetic.noise,
        )
        return loader, cfg.data.synthetic.classes, size
    manifest = load_manifest(cfg.data.train_shards, verify=cfg.data.verify)  # the user's error first
    from shards.loader import build_train_loader

    loader = build_train_loader(
        manifest,
        batch_size=cfg.loader.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.run.seed,
        backend=cfg.loader.backend,
        device=info.device,
        workers=cfg.loader.workers,
        augment=cfg.data.augment,
        channels_last=cfg.model.channels_last,
        prefetch=cfg.loader.prefetch,
        persistent_workers=cfg.loader.persistent_workers,
        source_workers=cfg.loader.source_workers,
    )
    return loader, manifest.num_classes, (int(manifest.image_size[0]), int(manifest.image_size[1]))


def build_configured_backbone(cfg: TrainConfig, image_size: tuple[int, int]) -> nn.Module:
    """The backbone `model.*` names; a constructor's refusal of `model.kwargs` as one line."""
    m = cfg.model
    try:
        return build_backbone(m.backbone, m.embedding_size, image_size, **m.kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model.kwargs={m.kwargs}: cannot build backbone {m.backbone!r} ({first})") from None


@dataclass
class RunParts:
    """What one run trains with, built by `build_parts` before the resume loads a checkpoint into it.
    The compiled / DDP-wrapped module the steps call is made afterwards (`wrap_for_training`)."""

    loader: Any  # this rank's batches (batches_per_epoch, set_epoch, iter, close)
    num_classes: int
    steps_per_epoch: int  # optimizer steps of optim.accumulate micro-batches each
    total_steps: int
    backbone_spec: dict[str, Any]  # the checkpoint's "model" entry
    backbone: nn.Module  # the bare backbone: what checkpoints hold and validators embed with
    head: nn.Module  # the margin head (this rank's rows of it when sharded)
    parallel: str  # how the head spans the processes: "replicate" or "shard"
    backbone_and_head: BackboneAndHead  # both, on the device, unwrapped: every trained tensor
    backbone_params: list[nn.Parameter]  # the trainable ones, for clipping
    head_params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    head_state: head_parallel.HeadState
    schedule: Schedule
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None  # the autocast dtype; None for plain fp32
    autocast: torch.autocast
    teacher: Teacher | None  # distill.teacher, frozen, on the device; None: no distillation

    def checkpointed(self) -> dict[str, Any]:
        """The components whose states a training checkpoint holds besides the backbone's."""
        return {
            "head_state": self.head_state,
            "optimizer": head_parallel.OptimizerState(self.optimizer, self.head),
            "scaler": self.scaler,
            "scheduler": self.schedule,
        }


def build_parts(cfg: TrainConfig, info: dist_util.DistInfo) -> RunParts:
    """Seeds, data, model, optimizer, schedule and scaler: everything before the resume."""
    torch.manual_seed(cfg.run.seed + info.rank)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.run.deterministic
        torch.backends.cudnn.deterministic = cfg.run.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    check_head_impl(cfg.head.impl, info.device)
    loader, num_classes, image_size = build_loader(cfg, info)
    if loader.batches_per_epoch < cfg.optim.accumulate:
        raise UserError(
            f"{cfg.data.train_shards or 'data'}: {loader.batches_per_epoch} batches "
            f"per epoch per process at loader.batch_size={cfg.loader.batch_size}: "
            "too few samples"
        )
    steps_per_epoch = loader.batches_per_epoch // cfg.optim.accumulate
    spec = {
        "backbone": cfg.model.backbone,
        "embedding_size": cfg.model.embedding_size,
        "image_size": list(image_size),
        "kwargs": dict(cfg.model.kwargs),
    }
    backbone = build_configured_backbone(cfg, image_size)
    if cfg.model.init_from:
        init_backbone(backbone, spec, cfg.model.init_from)
    teacher = None
    if cfg.distill.teacher:
        teacher = Teacher(cfg.distill.teacher, info.device, cfg.model.embedding_size, image_size)
    parallel = head_parallel.resolve_parallel(cfg.head.parallel, info.world_size)
    head = head_parallel.build_head(
        parallel,
        num_classes,
        cfg.model.embedding_size,
        head_kwargs(cfg.head),
        cfg.head.sample_rate,
        cfg.run.seed,
    )
    both = BackboneAndHead(backbone, head).to(info.device)
    if cfg.model.channels_last:
        both = both.to(memory_format=torch.channels_last)
    head_parallel.keep_gradient_in(head, cfg.head.grad_dtype, parallel, info.world_size)
    optimizer = build_optimizer(backbone, head, cfg.optim)
    total = cfg.schedule.steps or max(1, math.ceil(cfg.schedule.epochs * steps_per_epoch))
    dtype = resolve_dtype(cfg.precision.dtype, info.device)
    return RunParts(
        loader=loader,
        num_classes=num_classes,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        backbone_spec=spec,
        backbone=backbone,
        head=head,
        parallel=parallel,
        backbone_and_head=both,
        backbone_params=[p for p in backbone.parameters() if p.requires_grad],
        head_params=[p for p in head.parameters() if p.requires_grad],
        optimizer=optimizer,
        head_state=head_parallel.HeadState(head, optimizer),
        schedule=Schedule(optimizer, cfg.optim.lr, total, cfg.schedule),
        scaler=torch.amp.GradScaler(info.device.type, enabled=dtype == torch.float16),
        dtype=dtype,
        autocast=torch.autocast(info.device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
        teacher=teacher,
    )


def wrap_for_training(
    parts: RunParts, cfg: TrainConfig, info: dist_util.DistInfo
) -> tuple[nn.Module, DDP | None]:
    """(the module the steps call, the DDP wrapper inside it or None): the backbone compiled and
    DDP-wrapped as configured. With several processes DDP goes around backbone and head (replicate)
    or around the backbone alone (shard: the head's gradients are never all-reduced). After the
    resume: DDP starts every rank from rank 0's weights."""
    shard = parts.parallel == "shard" and info.enabled
    if cfg.model.compile:
        # The backbone alone, in place (its state_dict keys stay as they are). The head stays
        # eager: its autograd Function and Python-int step would be graph breaks and guards.
        backend = cfg.model.compile_backend
        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise UserError(
                f"model.compile_backend={backend!r}: not a torch.compile backend here "
                f"(inductor, cudagraphs, aot_eager, eager, ...)"
            )
        parts.backbone.compile(backend=backend)
    inner: nn.Module = parts.backbone if shard else parts.backbone_and_head
    ddp = None
    if info.enabled:
        ids = [info.device.index] if info.device.type == "cuda" else None
        inner = ddp = DDP(inner, device_ids=ids, gradient_as_bucket_view=True)
    if shard:
        return BackboneAndHead(inner, parts.head, grad_scale=float(info.world_size)), ddp
    return inner, ddp


@dataclass
class Window:
    """Sums over a stretch of steps, for a log record's rates (and the run's steady rate)."""

    loss: float = 0.0
    distill: float = 0.0  # the distillation term, unweighted (in `loss` times distill.weight)
    n: int = 0  # finite steps (the loss averages are over these)
    wait: float = 0.0  # seconds waiting for data
    time: float = 0.0  # seconds of whole steps
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
class Throughput:
    """The open log window, and the run's steady rate: every closed window but the first, which
    holds start-up (worker spawn, cuDNN autotuning, Triton compilation)."""

    window: Window = field(default_factory=Window)
    first: Window | None = None
    steady: Window = field(default_factory=Window)

    def close_window(self) -> None:
        if self.first is None:
            self.first = self.window
        else:
            self.steady.add(self.window)
        self.window = Window()

    def run_rate(self) -> Window | None:
        """The steady windows; the first alone in a run that short; None before any step."""
        rate = self.steady if self.steady.time or self.first is None else self.first
        return rate if rate.time else None


@dataclass
class StepResult:
    finite: bool
    loss: torch.Tensor  # 0-d, on the device: read only when logged
    distill: torch.Tensor | None  # the unweighted distillation term, likewise; None: no teacher
    lr: float  # the LR this step ran with
    wait: float
    seconds: float


class Trainer:
    """One training run (this process's part of it), built whole here. `fit()` runs it and returns
    the summary."""

    def __init__(
        self,
        cfg: TrainConfig,
        info: dist_util.DistInfo,
        validators: Sequence[Validator] = (),
        hooks: TrainerHooks | None = None,
    ) -> None:
        self.cfg, self.info = cfg, info
        self.validators = list(validators)
        self.hooks = hooks or TrainerHooks()
        self.run_dir = Path(cfg.run.dir)
        self.ckdir = CheckpointDir(self.run_dir / "checkpoints", cfg.checkpoint.keep_last)
        self.parts = build_parts(cfg, info)
        self.state, self.resumed_from = self.resume()  # the position, which every step moves on
        if info.is_main:
            save_resolved(cfg, self.run_dir / "config.yaml")
        self.train_module, self.ddp = wrap_for_training(self.parts, cfg, info)
        self.log = MetricsLogger(
            self.run_dir,
            self.parts.total_steps,
            self.state.step,
            cfg.logging.display,
            cfg.logging.tensorboard,
            info.is_main,
        )
        # What the run has seen so far, not checkpointed:
        self.nonfinite_run = 0  # non-finite steps in a row (the divergence guard)
        self.last_val: dict[str, Any] = {}  # the latest validation's figures
        self.throughput = Throughput()
        self.summary: dict[str, Any] = {
            "loader": self._loader_name(),
            "dtype": str(self.parts.dtype).removeprefix("torch.") if self.parts.dtype else "float32",
        }
        # The loader's iterator, started by `_start` (after the untrained checkpoint); ends each epoch.
        self.batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _loader_name(self) -> str:
        return getattr(self.parts.loader, "backend", self.cfg.data.source)

    def resume(self) -> tuple[TrainState, Path | None]:
        """Continue from a checkpoint as `checkpoint.resume` says: (the position to start from, the
        file resumed from or None for a fresh start)."""
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return TrainState(), None
        if mode == "auto":
            if self.info.is_main:
                self.ckdir.clean_partial()
            found = self.ckdir.newest_complete()
        else:
            found = (Path(mode), load_checkpoint(mode))
            reason = unusable_reason(found[1])
            if reason is not None:
                raise UserError(
                    f"checkpoint.resume={mode}: cannot resume: {reason} (pick an earlier "
                    "checkpoint, or checkpoint.resume=auto for the newest usable one)"
                )
        if found is None:
            return TrainState(), None
        path, ckpt = found
        parts = self.parts
        check_resumable(
            path,
            ckpt,
            parts.backbone_spec,
            parts.num_classes,
            self.cfg.loader.batch_size,
            self.info.world_size,
        )
        check_same_teacher(path, ckpt.get("teacher"), parts.teacher.record() if parts.teacher else None)
        state = restore_training(ckpt, parts.backbone, parts.checkpointed())
        ranks = ckpt["rng"].get("per_rank", [])
        if len(ranks) == self.info.world_size:  # the same process count: each rank's own streams
            restore_rng(ranks[self.info.rank])
        else:
            torch.manual_seed(self.cfg.run.seed + self.info.rank + 7919 * state.step)
        return state, path

    # ---- one step ------------------------------------------------------------------------------

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self.batches)
        except StopIteration:
            self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0
            self.parts.loader.set_epoch(self.state.epoch)
            self.batches = iter(self.parts.loader)
            return next(self.batches)

    def train_step(self) -> StepResult:
        """Forward/backward over `optim.accumulate` micro-batches, then the guarded optimizer step."""
        cfg, st, p = self.cfg, self.state, self.parts
        t_step, wait = time.perf_counter(), 0.0
        step_loss = torch.zeros((), device=self.info.device)
        step_distill = None if p.teacher is None else torch.zeros((), device=self.info.device)
        for micro in range(cfg.optim.accumulate):
            t_wait = time.perf_counter()
            images, labels = self._next_batch()
            wait += time.perf_counter() - t_wait
            st.batch_in_epoch += 1
            sync = micro == cfg.optim.accumulate - 1 or not self.info.enabled
            with nullcontext() if sync or self.ddp is None else self.ddp.no_sync():
                loss, emb = self.train_module(images, labels, p.autocast)
                if p.teacher is not None:
                    term = distill_loss(emb, p.teacher.embed(images, p.autocast), cfg.distill.loss)
                    loss = loss + cfg.distill.weight * term
                    step_distill += term.detach() / cfg.optim.accumulate
                loss = self.hooks.micro_batch_loss(st.step, loss)
                p.scaler.scale(loss / cfg.optim.accumulate).backward()
            step_loss += loss.detach().float() / cfg.optim.accumulate
        self.hooks.after_backward(st.step)
        p.scaler.unscale_(p.optimizer)
        max_norm = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else float("inf")
        grad_norm = head_parallel.clip_grad_norm(
            p.backbone_params,
            p.head_params,
            max_norm,
            p.parallel == "shard" and self.info.enabled,
            p.optimizer,
        )
        # One host sync per step for the guard; DDP has averaged the gradients (and a sharded head's
        # norm is summed over the ranks), so every rank sees the same norm, and the loss flag is
        # reduced so all ranks skip together.
        # (fp16: the scaler itself skips steps with inf gradients while it calibrates.)
        grads_ok = p.scaler.is_enabled() or bool(torch.isfinite(grad_norm))
        finite = dist_util.all_true(bool(torch.isfinite(step_loss)) and grads_ok, self.info)
        if finite:
            # Partial FC: only the sampled centres (and their optimizer state) step
            head_parallel.optimizer_step(p.optimizer, p.head, lambda: p.scaler.step(p.optimizer))
            self.nonfinite_run = 0
        else:
            st.skipped_total += 1
            self.nonfinite_run += 1
        p.scaler.update()
        p.optimizer.zero_grad(set_to_none=True)
        st.step += 1
        lr = p.schedule.lr
        p.schedule.advance()
        p.head.set_step(st.step)
        return StepResult(finite, step_loss, step_distill, lr, wait, time.perf_counter() - t_step)

    # ---- logging, validation, checkpoints ---------------------------------------------------------

    def log_window(self, lr: float) -> None:
        """One metrics.jsonl record for the steps since the last one; the window starts afresh."""
        st, w = self.state, self.throughput.window
        acc = self.parts.head.last_accuracy
        # Each rank's loss and accuracy cover its own rows with a replicated head (the global batch's
        # with a sharded one): log their mean over the ranks, so both modes log the same figure.
        loss, distill, acc = dist_util.mean_over_ranks(
            [
                w.loss / w.n if w.n else float("nan"),
                w.distill / w.n if w.n else float("nan"),
                float("nan") if acc is None else float(acc),
            ],
            self.info,
        )
        images_per_s, data_wait = w.rates()
        record = {
            "step": st.step,
            "epoch": round(st.epoch + st.batch_in_epoch / max(1, self.parts.loader.batches_per_epoch), 4),
            "loss": None if loss != loss else loss,
            **({"distill_loss": None if distill != distill else distill} if self.parts.teacher else {}),
            "batch_acc": None if acc != acc else acc,
            "lr": lr,
            "images_per_s": images_per_s,
            "data_wait": data_wait,
            "skipped_total": st.skipped_total,
            "eta_s": round(self.log.eta_s(st.step), 1),
        }
        if self.info.device.type == "cuda":
            record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.info.device) / 2**30, 3)
        self.log.log(record)
        self.summary.update(record)
        self.throughput.close_window()

    def validate(self) -> dict[str, Any]:
        """Every validator on rank 0; the first one's accuracy is broadcast (it picks best.pt)."""
        res: dict[str, Any] = {}
        if self.info.is_main:
            t = time.perf_counter()
            backbone = self.parts.backbone
            for i, validator in enumerate(self.validators):
                metrics = validator(backbone)
                res.update(metrics if i == 0 else {f"{validator.name}_{k}": v for k, v in metrics.items()})
            res["val_seconds"] = time.perf_counter() - t
        acc = dist_util.broadcast_float(float(res.get("accuracy_mean", -1.0)), self.info)
        return {"val_accuracy": acc, **{k: v for k, v in res.items() if k != "accuracy_mean"}}

    def save_checkpoint(self, best_now: bool, metrics: dict[str, Any], name: str | None = None) -> None:
        """A step checkpoint (with last.pt and, if `best_now`, best.pt), or the file `name`. Every rank
        calls it: each one's RNG state goes in."""
        p = self.parts
        rngs = dist_util.gather_objects(capture_rng(), self.info)
        p.head_state.gather()  # a sharded head's rows come to rank 0
        if not self.info.is_main:
            return
        ckpt = training_checkpoint(
            p.backbone_spec,
            p.backbone,
            p.checkpointed(),
            self.state,
            rngs,
            to_dict(self.cfg),
            metrics,
            teacher=p.teacher.record() if p.teacher is not None else None,
        )
        if name is not None:
            atomic_save(ckpt, self.ckdir.root / name)
            return
        step = self.state.step
        self.ckdir.save(
            ckpt, step, best=best_now, on_written=lambda f: self.hooks.checkpoint_written(step, f)
        )

    # ---- the loop --------------------------------------------------------------------------------

    def _start(self) -> None:
        """Say what runs, write the untrained checkpoint if asked, start the data."""
        cfg, info, p = self.cfg, self.info, self.parts
        if self.resumed_from is not None:
            self.log.message(f"resumed from {self.resumed_from} at step {self.state.step}")
        if self.log.dropped:
            self.log.message(
                f"metrics.jsonl: dropped {self.log.dropped} record(s) of steps after "
                f"{self.state.step}, which this run repeats"
            )
        self.log.message(
            f"training {cfg.model.backbone} on {p.num_classes} classes, {info.world_size} process(es) on "
            f"{info.device}, {p.dtype or 'fp32'}, {p.total_steps} steps, {p.steps_per_epoch} steps/epoch, "
            f"global batch {cfg.loader.batch_size * info.world_size * cfg.optim.accumulate}, "
            f"{self._loader_name()} loader"
        )
        self.log.message(
            head_parallel.describe(
                p.head, p.parallel, p.optimizer, cfg.loader.batch_size, info.world_size, info.backend
            )
        )
        for line in recipe_warnings(cfg):
            self.log.message(line)
        if cfg.checkpoint.save_untrained and self.state.step == 0:
            self.save_checkpoint(False, {}, name="untrained.pt")
        self.train_module.train()
        p.loader.set_epoch(self.state.epoch, start_batch=self.state.batch_in_epoch)
        self.batches = iter(p.loader)

    def _after_step(self, res: StepResult) -> None:
        """Account the step; then the guard, validation, the log record and the checkpoint, as due."""
        cfg, st, window = self.cfg, self.state, self.throughput.window
        if res.finite:
            window.loss += float(res.loss)
            window.distill += 0.0 if res.distill is None else float(res.distill)
            window.n += 1
        window.add(
            Window(
                wait=res.wait,
                time=res.seconds,
                images=cfg.loader.batch_size * cfg.optim.accumulate * self.info.world_size,
            )
        )
        if self.nonfinite_run >= cfg.optim.max_nonfinite_in_row:
            self._diverged(f"{self.nonfinite_run} non-finite steps in a row at step {st.step}")
        last = st.step == self.parts.total_steps
        val_due = bool(self.validators) and (st.step % cfg.validation.every_steps == 0 or last)
        if val_due:
            self.last_val = self.validate()
        if st.step % cfg.logging.every_steps == 0 or last:
            self.log_window(res.lr)
        if val_due:
            self.log.log({"step": st.step, **self.last_val})
        improved = val_due and self.last_val.get("val_accuracy", -1.0) > st.best_accuracy
        if improved:
            st.best_accuracy = self.last_val["val_accuracy"]
        # Never after a skipped (non-finite) step: a checkpoint is a state a resume may continue from.
        due = st.step % cfg.checkpoint.every_steps == 0 or last or improved
        if due and res.finite:
            # A finite step can still overflow the weights (a huge LR); all ranks decide together.
            if not dist_util.all_true(self._state_finite(), self.info):
                self._diverged(f"weights or optimizer state NaN or infinite after step {st.step}")
            self.save_checkpoint(improved, self.last_val)

    def _state_finite(self) -> bool:
        """Every parameter, buffer (BN statistics) and optimizer-state tensor finite (one host sync)."""
        both, optimizer = self.parts.backbone_and_head, self.parts.optimizer
        tensors = (
            list(both.parameters())
            + list(both.buffers())
            + [
                v
                for state in optimizer.state.values()
                for v in state.values()
                if isinstance(v, torch.Tensor) and v.is_floating_point()
            ]
        )
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
            f"{restart}); lower optim.lr, raise schedule.warmup_steps or set optim.clip_grad_norm"
        )

    def fit(self) -> dict[str, Any]:
        """Run the remaining steps; returns the summary (rank 0's view)."""
        try:
            self._start()
            while self.state.step < self.parts.total_steps:
                self._after_step(self.train_step())
            if self.nonfinite_run:  # the final state is not a trained model: no "done", no exit 0
                self._diverged(f"the run ended on {self.nonfinite_run} non-finite step(s) in a row")
            self.hooks.finished(
                FinishedRun(self.run_dir, self.info.rank, self.state.step, self.parts.backbone_and_head)
            )
            return self._summary()
        finally:
            self.log.close()
            getattr(self.parts.loader, "close", lambda: None)()  # persistent reader workers end with the run

    def _summary(self) -> dict[str, Any]:
        st = self.state
        self.summary.update(
            {
                "step": st.step,
                "best_accuracy": st.best_accuracy,
                "skipped_total": st.skipped_total,
                **self.last_val,
            }
        )
        run_rate = self.throughput.run_rate()
        if run_rate is not None:
            self.summary["steady_images_per_s"], self.summary["steady_data_wait"] = run_rate.rates()
        if self.info.is_main:
            print(f"done: {st.step} steps; checkpoints in {self.ckdir.root}", file=sys.stderr)
        return self.summary


def train(
    cfg: TrainConfig, validators: Sequence[Validator] = (), hooks: TrainerHooks | None = None
) -> dict[str, Any]:
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
