"""The training loop: DDP, autocast, accumulation, clipping, the divergence guard, checkpoints,
validation and logging. `train(cfg)` is everything `trainer/main.py` runs."""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from shards.errors import UserError
from shards.manifest import load_manifest
from trainer import distributed as dist_util
from trainer.backbones import build_backbone
from trainer.checkpoint import (
    CheckpointDir,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_embedding_checkpoint,
)
from trainer.config import TrainConfig, save_resolved, to_dict
from trainer.metrics import MetricsLogger
from trainer.optim import Schedule, build_optimizer


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message says where the checkpoint is."""


class TrainModule(nn.Module):
    """Backbone + margin head in one module, so one DDP wrapper syncs both."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor, labels: torch.Tensor, autocast: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast:
            emb = self.backbone(images)
        # The head's softmax runs in fp32 whatever the backbone's precision.
        with torch.autocast(images.device.type, enabled=False):
            loss = self.head(emb.float(), labels)
        return loss, emb


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if name == "fp16" and device.type != "cuda":
        raise UserError("precision.dtype=fp16 needs a GPU (use bf16 or fp32 on the CPU)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]


def build_loader(cfg: TrainConfig, info: dist_util.DistInfo) -> tuple[Any, int, tuple[int, int]]:
    """(loader, num_classes, image_size) for the configured data source."""
    if cfg.data.source == "synthetic":
        size = tuple(cfg.data.synthetic_image_size)
        loader = __import__("trainer.synthetic", fromlist=["SyntheticLoader"]).SyntheticLoader(
            cfg.data.synthetic_classes, cfg.data.synthetic_per_class, size, batch_size=cfg.loader.batch_size,
            rank=info.rank, world_size=info.world_size, seed=cfg.run.seed, device=info.device,
            channels_last=cfg.model.channels_last, noise=cfg.data.synthetic_noise,
        )
        return loader, cfg.data.synthetic_classes, size  # type: ignore[return-value]
    manifest = load_manifest(cfg.data.train_shards, verify=cfg.data.verify)  # the user's error first
    from shards.augment import AugmentConfig
    from shards.loader import build_train_loader

    a = cfg.data.augment
    augment = AugmentConfig(flip=a.flip, crop_scale=tuple(a.crop_scale) if a.crop_scale else None,
                            color_jitter=a.color_jitter, grayscale_p=a.grayscale_p, blur_p=a.blur_p,
                            erase_p=a.erase_p)
    loader = build_train_loader(
        manifest, batch_size=cfg.loader.batch_size, rank=info.rank, world_size=info.world_size,
        seed=cfg.run.seed, backend=cfg.loader.backend, device=info.device, workers=cfg.loader.workers,
        augment=augment, channels_last=cfg.model.channels_last, prefetch=cfg.loader.prefetch,
    )
    return loader, manifest.num_classes, tuple(manifest.image_size)  # type: ignore[return-value]


def _unwrap(module: nn.Module) -> nn.Module:
    module = getattr(module, "module", module)  # DDP
    return getattr(module, "_orig_mod", module)  # torch.compile


@torch.no_grad()
def batch_accuracy(emb: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> float:
    """Top-1 of the nearest class centre by cosine (what the margin head's logits rank, minus margin)."""
    w = F.normalize(head.weight.float(), dim=1)
    pred = (F.normalize(emb.float(), dim=1) @ w.t()).argmax(1)
    return float((pred == labels).float().mean())


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or continue) the configured training. Returns the final summary (rank 0's view)."""
    info = dist_util.setup(cfg.run.devices)
    try:
        return _run(cfg, info)
    finally:
        # _run's frame (model, optimizer, DDP buckets) is gone here; collect it before the group dies.
        dist_util.teardown(info)


def _run(cfg: TrainConfig, info: dist_util.DistInfo) -> dict[str, Any]:
    from heads import MarginHead

    run_dir = Path(cfg.run.dir)
    ckdir = CheckpointDir(run_dir / "checkpoints", cfg.checkpoint.keep_last)
    torch.manual_seed(cfg.run.seed + info.rank)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.run.deterministic
        torch.backends.cudnn.deterministic = cfg.run.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    lfw = None
    if cfg.validation.lfw_shards:
        from trainer.validation import open_lfw

        lfw = open_lfw(cfg.validation.lfw_shards)  # fail before training, not at the first validation
    loader, num_classes, image_size = build_loader(cfg, info)
    if loader.batches_per_epoch < cfg.optim.accumulate:
        raise UserError(f"{cfg.data.train_shards or 'data'}: {loader.batches_per_epoch} batches per epoch "
                        f"per process at loader.batch_size={cfg.loader.batch_size}: too few samples")
    steps_per_epoch = loader.batches_per_epoch // cfg.optim.accumulate
    total = cfg.schedule.steps or max(1, math.ceil(cfg.schedule.epochs * steps_per_epoch))

    spec = {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size,
            "image_size": list(image_size), "kwargs": dict(cfg.model.kwargs)}
    try:
        backbone = build_backbone(cfg.model.backbone, cfg.model.embedding_size, image_size,
                                  **cfg.model.kwargs)
    except TypeError as err:
        raise UserError(f"model.kwargs: {err}") from None
    head = MarginHead(num_classes, cfg.model.embedding_size, margin=cfg.head.margin, s=cfg.head.s,
                      m=cfg.head.m, t=cfg.head.t, impl=cfg.head.impl)
    module = TrainModule(backbone, head).to(info.device)
    if cfg.model.channels_last:
        module = module.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(backbone, head, cfg.optim)
    schedule = Schedule(optimizer, cfg.optim.lr, total, cfg.schedule)
    dtype = resolve_dtype(cfg.precision.dtype, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=dtype == torch.float16)

    # ---- resume ------------------------------------------------------------------------------
    step, epoch, batch_in_epoch = 0, 0, 0
    best, skipped_total = -1.0, 0
    resumed_from = None
    if cfg.checkpoint.resume != "never":
        found = None
        if cfg.checkpoint.resume == "auto":
            if info.is_main:
                ckdir.clean_partial()
            found = ckdir.newest_complete()
        else:
            found = (Path(cfg.checkpoint.resume), load_checkpoint(cfg.checkpoint.resume))
        if found is not None:
            resumed_from, ckpt = found
            if "optimizer" not in ckpt:
                raise UserError(f"{resumed_from}: an embedding-only checkpoint cannot resume training")
            backbone.load_state_dict(ckpt["backbone_state"])
            head.load_state_dict(ckpt["head_state"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            schedule.load_state_dict(ckpt["scheduler"])
            step, epoch = int(ckpt["step"]), int(ckpt["epoch"])
            batch_in_epoch = int(ckpt["data_position"]["batch"])
            best = float(ckpt["metrics"].get("best_accuracy", -1.0))
            skipped_total = int(ckpt["metrics"].get("skipped_total", 0))
            ranks = ckpt["rng"].get("per_rank", [])
            if len(ranks) == info.world_size:
                restore_rng(ranks[info.rank])
            else:
                torch.manual_seed(cfg.run.seed + info.rank + 7919 * step)

    if info.is_main:
        save_resolved(cfg, run_dir / "config.yaml")
    if cfg.model.compile:
        module = torch.compile(module)  # type: ignore[assignment]
    model: nn.Module = module
    if info.enabled:
        model = DDP(module, device_ids=[info.device.index] if info.device.type == "cuda" else None)

    log = MetricsLogger(run_dir, total, step, cfg.logging.display, cfg.logging.tensorboard, info.is_main)
    if resumed_from is not None:
        log.message(f"resumed from {resumed_from} at step {step}")
    log.message(f"training {cfg.model.backbone} on {num_classes} classes, {info.world_size} process(es) on "
                f"{info.device}, {dtype or 'fp32'}, {total} steps, {steps_per_epoch} steps/epoch, "
                f"global batch {cfg.loader.batch_size * info.world_size * cfg.optim.accumulate}, "
                f"{getattr(loader, 'backend', cfg.data.source)} loader")

    def checkpoint(best_now: bool, metrics: dict[str, Any], name: str | None = None) -> None:
        rngs = dist_util.gather_objects(capture_rng(), info)
        if not info.is_main:
            return
        extra = {
            "head_state": _unwrap(module).head.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "scheduler": schedule.state_dict(), "step": step, "epoch": epoch,
            "data_position": {"epoch": epoch, "batch": batch_in_epoch}, "rng": {"per_rank": rngs},
            "config": to_dict(cfg),
            "metrics": {"best_accuracy": best, "skipped_total": skipped_total, **metrics},
        }
        state = _unwrap(module).backbone.state_dict()
        if name is not None:
            save_embedding_checkpoint(ckdir.root / name, spec, state, **extra)
            return
        from trainer.checkpoint import FORMAT, VERSION

        ckpt = {"format": FORMAT, "version": VERSION, "model": spec,
                "backbone_state": {k: v.detach().cpu() for k, v in state.items()}, **extra}
        pause_here = cfg.debug.checkpoint_pause_step in (0, step)
        ckdir.save(ckpt, step, best=best_now, pause_s=cfg.debug.checkpoint_pause_s if pause_here else 0.0)

    if cfg.checkpoint.save_untrained and step == 0:
        checkpoint(False, {}, name="untrained.pt")

    def run_validation() -> dict[str, Any]:
        from trainer.validation import validate

        res: dict[str, Any] = {}
        if info.is_main and lfw is not None:
            t = time.perf_counter()
            res = validate(_unwrap(module).backbone, lfw, cfg.validation.batch_size, info.device, dtype,
                           cfg.model.channels_last)
            res["val_seconds"] = time.perf_counter() - t
        acc = dist_util.broadcast_float(float(res.get("accuracy_mean", -1.0)), info)
        return {"val_accuracy": acc, **{k: v for k, v in res.items() if k != "accuracy_mean"}}

    autocast = torch.autocast(info.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    params = [p for p in module.parameters() if p.requires_grad]
    nonfinite_run = 0
    window = {"loss": 0.0, "acc": 0.0, "acc_n": 0, "n": 0, "wait": 0.0, "time": 0.0, "images": 0}
    # The run's throughput for the summary: every log window but the first, which holds start-up
    # (worker spawn, cuDNN autotuning, Triton compilation); the first alone in a run that short.
    steady = {"wait": 0.0, "time": 0.0, "images": 0}
    first: dict[str, float] | None = None
    model.train()
    loader.set_epoch(epoch, start_batch=batch_in_epoch)
    batches = iter(loader)
    last_val: dict[str, Any] = {}
    summary: dict[str, Any] = {"loader": getattr(loader, "backend", cfg.data.source),
                               "dtype": str(dtype).removeprefix("torch.") if dtype else "float32"}
    try:
        while step < total:
            t_step = time.perf_counter()
            wait = 0.0
            step_loss = 0.0
            finite = True
            emb = labels = None
            for micro in range(cfg.optim.accumulate):
                t_wait = time.perf_counter()
                try:
                    images, labels = next(batches)
                except StopIteration:
                    epoch, batch_in_epoch = epoch + 1, 0
                    loader.set_epoch(epoch)
                    batches = iter(loader)
                    images, labels = next(batches)
                wait += time.perf_counter() - t_wait
                batch_in_epoch += 1
                sync = micro == cfg.optim.accumulate - 1 or not info.enabled
                ctx = nullcontext() if sync else model.no_sync()  # type: ignore[operator]
                with ctx:
                    loss, emb = model(images, labels, autocast)
                    if step in cfg.debug.nonfinite_steps:
                        loss = loss * float("inf")
                    scaler.scale(loss / cfg.optim.accumulate).backward()
                step_loss += loss.detach().float() / cfg.optim.accumulate
            if cfg.debug.step_sleep_s:
                time.sleep(cfg.debug.step_sleep_s)
            scaler.unscale_(optimizer)
            max_norm = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            # One host sync per step for the guard; DDP has averaged the gradients, so every rank
            # sees the same norm, and the loss flag is reduced so all ranks skip together.
            # (fp16: the scaler itself skips steps with inf gradients while it calibrates.)
            grads_ok = scaler.is_enabled() or bool(torch.isfinite(grad_norm))
            ok_local = bool(torch.isfinite(step_loss)) and grads_ok
            finite = dist_util.all_true(ok_local, info)
            if finite:
                scaler.step(optimizer)
                nonfinite_run = 0
            else:
                skipped_total += 1
                nonfinite_run += 1
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            lr = schedule.lr
            schedule.advance()
            if hasattr(_unwrap(module).head, "set_step"):
                _unwrap(module).head.set_step(step)

            dt = time.perf_counter() - t_step
            if finite:
                window["loss"] += float(step_loss)
                window["n"] += 1
            window["wait"] += wait
            window["time"] += dt
            window["images"] += cfg.loader.batch_size * cfg.optim.accumulate * info.world_size

            if nonfinite_run >= cfg.optim.max_nonfinite_in_row:
                checkpoint(False, {"diverged": True})
                where = ckdir.root / f"step-{step:08d}.pt"
                raise TrainingDiverged(
                    f"training diverged: {nonfinite_run} non-finite steps in a row at step {step} "
                    f"({skipped_total} skipped in total); state saved to {where} "
                    f"(lower optim.lr, raise schedule.warmup_steps or set optim.clip_grad_norm)")

            val_due = lfw is not None and (step % cfg.validation.every_steps == 0 or step == total)
            if val_due:
                last_val = run_validation()
            log_due = step % cfg.logging.every_steps == 0 or step == total
            if log_due:
                head_now = _unwrap(module).head
                if getattr(head_now, "last_accuracy", None) is not None:
                    acc = float(head_now.last_accuracy)
                else:
                    acc = batch_accuracy(emb, labels, head_now) if emb is not None else None
                frac = batch_in_epoch / max(1, loader.batches_per_epoch)
                record = {
                    "step": step, "epoch": round(epoch + frac, 4),
                    "loss": window["loss"] / window["n"] if window["n"] else None, "batch_acc": acc, "lr": lr,
                    "images_per_s": window["images"] / window["time"] if window["time"] else None,
                    "data_wait": window["wait"] / window["time"] if window["time"] else None,
                    "skipped_total": skipped_total, "eta_s": round(log.eta_s(step), 1),
                }
                if info.device.type == "cuda":
                    record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(info.device) / 2**30, 3)
                log.log(record)
                summary.update(record)
                if first is None:
                    first = {k: window[k] for k in steady}
                else:
                    for k in steady:
                        steady[k] += window[k]
                window = {k: 0 for k in window}
            if val_due:
                log.log({"step": step, **last_val})
            improved = val_due and last_val.get("val_accuracy", -1.0) > best
            if improved:
                best = last_val["val_accuracy"]
            if step % cfg.checkpoint.every_steps == 0 or step == total or improved:
                checkpoint(improved, last_val)
        if cfg.debug.dump_params:
            flat = {k: v.detach().cpu() for k, v in _unwrap(module).named_parameters()}
            torch.save(flat, run_dir / f"params-rank{info.rank}.pt")
        summary.update({"step": step, "best_accuracy": best, "skipped_total": skipped_total, **last_val})
        run_rate = steady if steady["time"] or first is None else first
        if run_rate["time"]:
            summary["steady_images_per_s"] = run_rate["images"] / run_rate["time"]
            summary["steady_data_wait"] = run_rate["wait"] / run_rate["time"]
        if info.is_main:
            print(f"done: {step} steps; checkpoints in {ckdir.root}", file=sys.stderr)
        return summary
    finally:
        log.close()
