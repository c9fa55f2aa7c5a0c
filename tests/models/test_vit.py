"""The face ViT (models/backbones/vit.py): sizes against the published ones, the training-only
regularizers, activation checkpointing, its recipe; and IResNet's stem stride."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from eval.verification.metrics import best_threshold
from models.backbones import build_backbone
from tests._trainer_util import metrics, tiny_overrides
from trainer.config import load_config
from trainer.optim import param_groups

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"width": 32, "depth": 2, "heads": 4, "patch": 8}  # 32x32 -> 16 tokens


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "params_m", "gmacs"),
    [
        # GMACs: arcface_torch README, "ViT For Face Recognition" table (its FLOPs column counts
        # multiply-adds: ViT-T 1.5, ViT-S 5.7, ViT-B 11.4, ViT-L 25.3); parameters: our count.
        ("vit_t", 19.14, 1.5),
        ("vit_s", 76.02, 5.7),
        ("vit_b", 113.83, 11.4),
        ("vit_l", 255.68, 25.3),
    ],
)
def test_variant_sizes_match_the_published_ones(name, params_m, gmacs):
    with torch.device("meta"):  # sizes only: no memory, no arithmetic
        model = build_backbone(name, 512, (112, 112)).eval()
        x = torch.empty(1, 3, 112, 112)
    assert count(model) == pytest.approx(params_m * 1e6, rel=1e-3)
    # The math attention is made of matmuls the counter knows (the CPU's fused kernel it does not).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as flops:
        out = model(x)
    assert out.shape == (1, 512)
    assert model.tokens == 144
    assert flops.get_total_flops() / 2 / 1e9 == pytest.approx(gmacs, abs=0.05)  # a MAC: 2 FLOPs


def _blocks_see(model: torch.nn.Module, x: torch.Tensor) -> int:
    """How many tokens the first block was given."""
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    model(x)
    hook.remove()
    return seen[0]


def test_masking_only_in_training_and_its_token_fills_the_gaps():
    torch.manual_seed(0)
    model = build_backbone("vit_t", 16, (32, 32), **SMALL, mask_ratio=0.25)
    x = torch.randn(4, 3, 32, 32)
    assert _blocks_see(model.train(), x) == 12  # 16 tokens, a quarter masked
    assert _blocks_see(model.eval(), x) == 16
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))  # eval: deterministic
    model.train()
    model(x).sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert build_backbone("vit_t", 16, (32, 32), **SMALL).mask_token is None  # ratio 0: no parameter
    with pytest.raises(ValueError, match="mask_ratio"):
        build_backbone("vit_t", 16, (32, 32), **SMALL, mask_ratio=0.99)


def test_drop_path_is_off_in_eval_and_on_in_training():
    torch.manual_seed(0)
    dropping = build_backbone("vit_t", 16, (32, 32), **SMALL, drop_path=0.5)
    plain = build_backbone("vit_t", 16, (32, 32), **SMALL, drop_path=0.0)
    plain.load_state_dict(dropping.state_dict())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dropping.eval()(x), plain.eval()(x))
        dropping.train()
        plain.train()
        torch.manual_seed(1)
        a = dropping(x)
        torch.manual_seed(1)
        assert not torch.allclose(a, plain(x))  # the last block drops at rate 0.5: some sample differs


def test_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    options = {**SMALL, "drop_path": 0.2, "mask_ratio": 0.25}  # random in training: RNG replayed
    plain = build_backbone("vit_t", 16, (32, 32), **options).train()
    saving = build_backbone("vit_t", 16, (32, 32), **options, checkpointing=True).train()
    saving.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for model in (plain, saving):
        torch.manual_seed(3)
        out = model(x)
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    for (name, p), q in zip(plain.named_parameters(), saving.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_bf16_autocast_and_bad_shapes():
    model = build_backbone("vit_t", 16, (32, 32), **SMALL, mask_ratio=0.25).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 16) and torch.isfinite(out).all()
    for bad, fragment in (
        ({"heads": 3}, "multiple of heads"),
        ({"patch": 64}, "larger than"),
        ({"depth": 0}, "depth"),
        ({"drop_path": 1.0}, "drop_path"),
    ):
        with pytest.raises(ValueError, match=fragment):
            build_backbone("vit_t", 16, (32, 32), **{**SMALL, **bad})


def test_exports_to_onnx_with_a_dynamic_batch(tmp_path):
    from eval.export_onnx import export, max_abs_diff

    options = {**SMALL, "mask_ratio": 0.25, "drop_path": 0.1}  # eval: neither is in the graph
    model = build_backbone("vit_t", 16, (32, 32), **options).eval()
    export(
        model,
        {"backbone": "vit_t", "embedding_size": 16, "image_size": [32, 32], "kwargs": options},
        tmp_path / "vit.onnx",
    )
    worst, scale = max_abs_diff(model, tmp_path / "vit.onnx", (32, 32), [1, 3])
    assert worst < 1e-4 * max(scale, 1.0), (worst, scale)


def test_no_weight_decay_on_position_embedding_and_mask_token():
    model = build_backbone("vit_t", 16, (32, 32), **SMALL, mask_ratio=0.25)
    decayed, undecayed = param_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    ids = {id(p) for p in undecayed["params"]}
    assert id(model.pos_embed) in ids and id(model.mask_token) in ids
    assert id(model.patch_embed.proj.weight) not in ids and id(model.blocks[0].attn.qkv.weight) not in ids


def test_published_vit_b_recipe_loads_and_builds():
    cfg = load_config(ROOT / "configs" / "webface42m_vit_b.yaml")
    assert (cfg.model.backbone, cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == (
        "vit_b",
        "adamw",
        1e-3,
        0.1,
    )
    assert (cfg.head.margin, cfg.head.m, cfg.head.sample_rate) == ("cosface", 0.4, 0.3)
    assert cfg.loader.batch_size * 8 * cfg.optim.accumulate == 24576
    with torch.device("meta"):
        model = build_backbone(cfg.model.backbone, cfg.model.embedding_size, (112, 112), **cfg.model.kwargs)
    assert model.mask_ratio == 0.05 and model.blocks[-1].drop_path.rate == pytest.approx(0.05)


# 2 blocks of width 64 on 64 tokens of 4x4 pixels, drop path and masking on
TRAINED = {"width": 64, "depth": 2, "heads": 4, "patch": 4, "drop_path": 0.1, "mask_ratio": 0.1}


def _verification_accuracy(checkpoint: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Best-threshold accuracy over every same-identity pair and as many different-identity ones."""
    model = build_backbone("vit_t", 32, (32, 32), **TRAINED)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["backbone_state"])
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model.eval()(images))
    i, j = torch.triu_indices(len(labels), len(labels), 1)
    scores, same = (emb[i] * emb[j]).sum(1), labels[i] == labels[j]
    pairs = torch.cat([same.nonzero().flatten(), (~same).nonzero().flatten()[::9][: int(same.sum())]])
    return best_threshold(scores[pairs].numpy(), same[pairs].numpy())[1]


def test_small_vit_trains_with_adamw_warmup_cosine_and_verifies_better(tmp_path):
    """ViT-T at a small size (TRAINED) on the trainers' synthetic identities with AdamW, warm-up and
    cosine: no step skipped, the loss falls, and the verification accuracy on unseen noisy samples
    of those identities rises (~10 s: 0.66 -> 1.0 when written)."""
    from trainer.engine import train
    from trainer.synthetic import SyntheticLoader

    kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in TRAINED.items()) + "}"
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path / "run",
            steps=24,
            **{
                "model.backbone": "vit_t",
                "model.kwargs": kwargs,
                "optim.name": "adamw",
                "optim.lr": 1e-3,
                "optim.weight_decay": 0.05,
                "schedule.warmup_steps": 4,
                "schedule.decay": "cosine",
                "data.synthetic.noise": 1.0,
                "checkpoint.save_untrained": "true",
                "checkpoint.every_steps": 100,
                "logging.every_steps": 4,
                "logging.tensorboard": "off",
            },
        ),
    )
    assert train(cfg)["step"] == 24
    rows = metrics(tmp_path / "run")
    assert rows[-1]["skipped_total"] == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["loss"] < 0.2 * rows[0]["loss"], rows

    # unseen samples: the training identities' clean patterns with noise of another seed
    clean = SyntheticLoader(8, 1, (32, 32), batch_size=8, noise=0.0).images
    noise = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(123))
    images, labels = (clean.repeat(4, 1, 1, 1) + noise).clamp(-1, 1), torch.arange(8).repeat(4)
    before = _verification_accuracy(tmp_path / "run" / "checkpoints" / "untrained.pt", images, labels)
    after = _verification_accuracy(tmp_path / "run" / "checkpoints" / "last.pt", images, labels)
    assert after >= before + 0.15 and after > 0.9, (before, after)


def test_iresnet_stem_stride_two_halves_the_maps():
    default = build_backbone("ir_small", 64, (112, 112))
    strided = build_backbone("ir_small", 64, (112, 112), stem_stride=2)
    assert default.stem[0].stride == (1, 1) and strided.stem[0].stride == (2, 2)
    channels = default.out_bn.num_features
    assert default.fc.in_features == channels * 7 * 7 and strided.fc.in_features == channels * 4 * 4
    assert strided.eval()(torch.randn(2, 3, 112, 112)).shape == (2, 64)
    torch.manual_seed(0)
    a = build_backbone("ir18", 64, (32, 32)).state_dict()
    torch.manual_seed(0)
    b = build_backbone("ir18", 64, (32, 32), stem_stride=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # default 1: today's network
    with pytest.raises(ValueError, match="stem_stride"):
        build_backbone("ir18", 64, (32, 32), stem_stride=3)
