"""Optimizer with decay only on weights (not norms, biases, PReLU slopes or position embeddings), and the
LR schedule."""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from heads.head_sgd import FusedHeadSGD
from trainer.config import OptimConfig, ScheduleConfig


def param_groups(module: nn.Module, weight_decay: float, lr_mult: float = 1.0) -> list[dict]:
    """Two groups: multi-dimensional weights get `weight_decay`; 1-D tensors (BN, biases, PReLU) and
    the names a module lists in its `no_weight_decay()` (a ViT's position embedding) none. Each
    group's learning rate is the schedule's times `lr_mult` (`Schedule` reads it)."""
    exempt = module.no_weight_decay() if hasattr(module, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 and name not in exempt else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_mult": lr_mult}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_mult": lr_mult})
    return [g for g in groups if g["params"]]


def build_optimizer(backbone: nn.Module, head: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    head_wd = cfg.weight_decay if cfg.head_weight_decay is None else cfg.head_weight_decay
    groups = param_groups(backbone, cfg.weight_decay, cfg.backbone_lr_mult) + param_groups(head, head_wd)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))  # type: ignore[arg-type]
    # torch's SGD, whose step of the head's weight is one Triton pass that also makes the next
    # forward's normalized copy when the head runs the fused engine (heads/head_sgd.py)
    return FusedHeadSGD(groups, head=head, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def lr_factor(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based): linear warm-up, then the decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    floor = cfg.min_lr_ratio
    if cfg.decay == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.decay == "poly":
        return floor + (1 - floor) * (1 - progress) ** cfg.power
    if cfg.decay == "step":
        # milestones are fractions of the whole run (or absolute steps when > 1)
        bounds = sorted(int(m * total) if m <= 1 else int(m) for m in cfg.milestones)
        return max(floor, cfg.gamma ** bisect.bisect_right(bounds, step))
    return 1.0


class Schedule:
    """Sets each group's LR from the step (times the group's `lr_mult`); its state is just the step
    (weights_only friendly). The multipliers are the config's, taken before a resume loads the
    optimizer's saved groups."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, total: int, cfg: ScheduleConfig):
        self.optimizer, self.base_lr, self.total, self.cfg = optimizer, base_lr, total, cfg
        self.lr_mults = [g.get("lr_mult", 1.0) for g in optimizer.param_groups]
        self.step_num = 0
        self.apply()

    def apply(self) -> float:
        lr = self.base_lr * lr_factor(self.step_num, self.total, self.cfg)
        for g, mult in zip(self.optimizer.param_groups, self.lr_mults):
            g["lr"] = lr * mult
        return lr

    def advance(self) -> float:
        self.step_num += 1
        return self.apply()

    @property
    def lr(self) -> float:
        """The schedule's rate now (the head's; the backbone's is it times optim.backbone_lr_mult)."""
        return self.base_lr * lr_factor(self.step_num, self.total, self.cfg)

    def state_dict(self) -> dict:
        return {"step": self.step_num, "total": self.total, "base_lr": self.base_lr}

    def load_state_dict(self, state: dict) -> None:
        self.step_num = int(state["step"])
        self.apply()
