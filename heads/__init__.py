"""Margin-softmax heads (CosFace, ArcFace, SphereFace, combined, AdaFace, MagFace, CurricularFace;
sub-center ArcFace; SV-Softmax; focal term).

    from heads import MarginHead
    head = MarginHead(num_classes, embed_dim, margin="arcface", s=64, m=0.5, t=1.0, impl="auto", seed=0)
    loss = head(embeddings, labels)                         # mean loss; raw (unnormalized) embeddings
    loss, acc = head(embeddings, labels, return_accuracy=True)
    head.last_accuracy                                      # 0-d tensor, detached, no host sync
    head.set_step(step)                                     # SphereFace's lambda annealing

`last_accuracy` (and the returned `acc`) is the fraction of rows whose target cosine is the
largest cosine, computed inside the pass without a B x C tensor.

impl: "reference" (plain PyTorch, B x C logits), "chunked" (PyTorch over blocks of classes),
"fused" (Triton; needs CUDA or TRITON_INTERPRET=1), "auto" (fused on CUDA, chunked elsewhere).
Margin options go as keyword arguments: sphereface `lambda_base, lambda_min, gamma, power`;
combined `m1, m2, m3`; adaface `m, h, t_alpha`; magface `l_a, u_a, l_m, u_m, lambda_g` (its norm
regularizer is part of the returned loss); curricularface `m` (not with t > 1). AdaFace's norm
statistics and CurricularFace's t are buffers of the head (`margin_batch_mean`, `margin_batch_std`,
`margin_t`): they move in a training forward only (`head.eval()` freezes them), from the global batch
when sharded, and travel in `state_dict()` and the trainer's checkpoints. `subcenters=K` (any margin,
every implementation, MarginHead and the sharded head): `weight` is (C K, D), class j's rows
j K .. j K + K - 1, a class's cosine the largest of its rows' (its gradient to that row alone, the
first on ties; the fused kernels take K as a constexpr, heads/fused.py); a sharded rank owns whole
classes and Partial FC samples all K rows of a class. `head.dominant_subcenters(embeddings, labels)`
returns the K=1 head of each class's dominant sub-center (the paper's cleaning step; a collective on
a sharded head). `gamma_focal` > 0 adds the focal
term. Inputs may be fp32, bf16 or fp16; the head computes in fp32 (float64 inputs stay float64 in
reference and chunked, for tests).
`block` (chunked only) is the number of classes per block. `operands` ("auto", "fp32", "bf16",
"fp16"): the dtype the class products read (auto: fp16 tensor-core operands on CUDA, fp32 on the
CPU; always fp32 accumulation; `heads.core.operand_dtype` says why fp16 rather than bf16).
`deterministic=True` (fused): no autotuning, fixed kernel configs, so results are bitwise equal
across processes; the default picks configs by timing (bitwise reproducible within a process,
possibly differing in the last bits between processes). No implementation uses atomics.
Every option is checked once, at construction (`heads.options.HeadOptions`, shared with the sharded
head): a bad one is a ValueError naming it. `seed`: the initial centres, N(0, 0.01^2), are a
function of (seed, class) alone (`heads.margin_head.init_centres`), the same in a sharded head on
any number of ranks; building a head draws nothing from torch's global generator.

Memory per class (C x D weight, fp32 master): the weight (4 D bytes), its gradient (4 D bytes: the
buffer the engine writes becomes `weight.grad` without a copy when the optimizer zeroes with
`set_to_none=True`, PyTorch's default; otherwise autograd adds it into the existing gradient), and
the optimizer's state (SGD momentum: 4 D bytes). `weight.grad` is in `heads.core.gradient_dtype`:
torch's `weight.grad_dtype` where it is set on the leaf weight (torch >= 2.10), else the weight's
dtype. `head.weight.grad_dtype = torch.bfloat16` (the trainer's `head.grad_dtype: bfloat16`; the
default stays float32) makes the engines write dW in bf16, 2 D bytes a class, half the backward's
largest write: each element is summed over the batch in fp32, then rounded to nearest (2^-8
relative at most).
`FusedHeadSGD` steps the fp32 weight and momentum with it; torch's AdamW fails on it, and autograd
would add a second backward's gradient into it in bf16, so the trainer refuses both. Working memory
does not grow with C: chunked holds a few B x block fp32 temporaries, fused 12 x B bytes per program
forward and a B x chunk block (2 bytes each; K columns a class with sub-centers, the chunk 1/K as
wide) plus a chunk of W in fp16 backward (see heads/fused.py). The reference holds several B x C
tensors.

Optimizer: `heads.head_sgd.FusedHeadSGD(params, head=head, **sgd_options)` is torch.optim.SGD whose
step of `head.weight` on the fused engine is one Triton pass that also makes the next forward's
16-bit copy of W (heads/fused_step.py; it reads an fp32 or bf16 gradient); elsewhere torch steps a
bf16 gradient as an fp32 copy, so the momentum stays fp32. The trainer's "sgd" is it.

The forward is kept out of `torch.compile` graphs (`torch.compiler.disable`): compile the backbone;
the head runs eagerly, so its Python-int training step (`set_step`) never becomes a Dynamo guard
that would recompile the graph at every step.
"""

from __future__ import annotations

from heads.margin_head import MarginHead
from heads.margins import Margin, build_margin
from heads.options import HeadOptions

__all__ = ["MarginHead", "HeadOptions", "Margin", "build_margin"]
