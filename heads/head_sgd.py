"""`FusedHeadSGD`: torch.optim.SGD whose step of the head's weight is heads.fused_step's one Triton
pass (SGD with momentum, and the next forward's Wn and inverse norms) where that applies.

Where it applies: the head's own weight, when the head runs the fused engine (so on CUDA, or under
TRITON_INTERPRET=1), with an fp32 contiguous weight and momentum, an fp32 or bf16 contiguous
gradient (bf16 where `weight.grad_dtype` asks for it: the trainer's head.grad_dtype), float lr and
weight decay, no `maximize` or `differentiable`. Everything else steps through torch.optim.SGD
itself: the backbone's parameters, a head on the chunked engine, Partial FC's sampled rows
(heads.sharded's `sampled_rows` steps a stand-in parameter in the weight's place); trainer/optim.py
builds torch's AdamW for "adamw", and the normalize pass then stays. The trainer's order is
unchanged: GradScaler unscales and skips a step with infinite gradients, and the clip by the global
norm runs, before `step()`, which reads the gradient as they left it. Where torch steps a parameter
whose gradient has another dtype (a bf16 gradient of the fp32 head weight on the chunked engine), it
steps a copy of the gradient in the parameter's dtype, so the momentum stays fp32 (torch's SGD would
make it bf16), and puts the gradient back as it was. The clip's multiply of the head's gradient may
be handed to the step (`defer_grad_scale`: the kernel multiplies as it reads, as the clip's own
in-place multiply would round, and no pass over the C x D gradient is made for it). Triton is
imported only when the fused step runs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# the gradients the fused step reads: fp32, or bf16 where the weight's grad_dtype asks for it
_GRAD_DTYPES = (torch.float32, torch.bfloat16)


class FusedHeadSGD(torch.optim.SGD):
    """torch.optim.SGD whose step of `head.weight` is heads.fused_step's `sgd_step_normalized` where
    that applies (the module docstring); every other parameter, and the head's weight elsewhere, step
    as in SGD. The state (`momentum_buffer` per parameter), param groups and state_dict are SGD's."""

    def __init__(self, params, head: nn.Module, **sgd) -> None:
        if sgd.get("fused"):
            raise ValueError("FusedHeadSGD: fused=True is torch's fused SGD; use torch.optim.SGD for it")
        super().__init__(params, **sgd)
        self.head = head  # a heads head: MarginHead or ShardedMarginHead
        self._grad_scales: dict[Tensor, Tensor] = {}  # parameter -> factor its next step applies

    def defer_grad_scale(self, p: Tensor, scale: Tensor) -> bool:
        """Take `p.grad *= scale` (a 0-d fp32 tensor on p's device: the clip's min(1, max / norm))
        into the next step instead of a pass over the gradient: True when the fused step applies to
        `p` (its kernel multiplies as it reads, the same rounding), else False (the caller
        multiplies). Until that step or zero_grad(), p.grad stays unscaled."""
        group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        if group is None or self._fused_engine(group, p) is None:
            return False
        if p in self._grad_scales:  # a second factor: the first one is applied now, in order
            p.grad.mul_(self._grad_scales.pop(p))
        self._grad_scales[p] = scale
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad_scales.clear()  # a skipped step drops its gradients' factors with them
        super().zero_grad(set_to_none)

    def _fused_engine(self, group: dict, p: Tensor):
        """The fused engine the step hands Wn to, or None where torch's step runs."""
        head = self.head
        if p is not head.weight or p.grad is None or p.grad.is_sparse:
            return None
        if group["maximize"] or group["differentiable"]:
            return None
        if isinstance(group["lr"], Tensor) or isinstance(group["weight_decay"], Tensor):
            return None  # a float() of either would wait for the device
        if head.resolved_impl(p.device) != "fused":  # its forward refused a device Triton cannot run on
            return None
        if getattr(head, "sampled", None) is not None:  # Partial FC: sampled_rows steps a stand-in
            return None
        buf = self.state.get(p, {}).get("momentum_buffer")
        kept = (p,) if buf is None else (p, buf)
        if any(t.dtype != torch.float32 for t in kept) or p.grad.dtype not in _GRAD_DTYPES:
            return None
        if not all(t.is_contiguous() for t in (*kept, p.grad)):
            return None
        return head.engine("fused")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fused = []  # (group, parameter, its gradient, engine)
        widened = []  # (parameter, its gradient, its grad_dtype): torch steps a copy in p's dtype
        for group in self.param_groups:
            for p in group["params"]:
                engine = self._fused_engine(group, p)
                if engine is not None:
                    fused.append((group, p, p.grad, engine))
                    p.grad = None  # torch's step skips a parameter without a gradient
                    continue
                if p.grad is not None and p.grad.dtype != p.dtype:
                    widened.append((p, p.grad, p.grad_dtype))
                    p.grad_dtype = None  # any dtype: torch refuses a gradient other than grad_dtype
                    p.grad = p.grad.to(p.dtype)
                if p in self._grad_scales:  # deferred, but the fused step no longer applies
                    p.grad.mul_(self._grad_scales.pop(p))
        try:
            super().step()
        finally:
            for _, p, grad, _ in fused:
                p.grad = grad
            for p, grad, dtype in widened:
                p.grad = grad
                p.grad_dtype = dtype
        for group, p, _, engine in fused:
            self._fused_step(group, p, engine)
        return loss

    def _fused_step(self, group: dict, p: Tensor, engine) -> None:
        from heads.fused_step import sgd_step_normalized  # imports triton

        mu = group["momentum"]
        buf = self.state[p].get("momentum_buffer") if mu != 0 else None
        first = mu != 0 and buf is None
        if first:
            buf = torch.empty_like(p, memory_format=torch.contiguous_format)
        sgd_step_normalized(
            p,
            p.grad,
            buf,
            engine,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=mu,
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            first=first,
            grad_scale=self._grad_scales.pop(p, None),
        )
        if mu != 0:
            self.state[p]["momentum_buffer"] = buf
