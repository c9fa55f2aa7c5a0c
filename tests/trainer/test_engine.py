"""The training loop: a plain `python trainer/main.py` run, overfitting, the divergence guard,
the optimizer's decay groups and the LR schedule."""

from __future__ import annotations

import json

import pytest
import torch

from common.cli import UserError
from heads import MarginHead
from heads.head_sgd import FusedHeadSGD
from models.backbones import build_backbone
from models.model_file import load_embedding_model
from tests._heads_util import needs_grad_dtype
from tests._trainer_faults import FaultHooks
from tests._trainer_util import metrics, run_main, tiny_overrides
from trainer.checkpoint import load_checkpoint
from trainer.config import OptimConfig, ScheduleConfig, load_config
from trainer.engine import train
from trainer.main import main
from trainer.optim import build_optimizer, lr_factor, param_groups


def test_python_main_trains_and_writes_the_run_folder(tmp_path):
    run = tmp_path / "run"
    proc = run_main(tiny_overrides(run, steps=8, **{"checkpoint.save_untrained": "true"}))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 8 and summary["skipped_total"] == 0
    ck = run / "checkpoints"
    names = {p.name for p in ck.iterdir()}
    assert names == {"untrained.pt", "last.pt", "step-00000004.pt", "step-00000008.pt"}
    assert (run / "config.yaml").is_file()
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("loss", "batch_acc", "lr", "images_per_s", "data_wait", "epoch"):
        assert rows[-1][key] is not None
    # The summary's run throughput pools every log window but the first (start-up).
    rates, waits = [r["images_per_s"] for r in rows[1:]], [r["data_wait"] for r in rows[1:]]
    assert min(rates) <= summary["steady_images_per_s"] <= max(rates)
    assert min(waits) <= summary["steady_data_wait"] <= max(waits)
    # untrained.pt is the network before any step; last.pt has moved away from it.
    before, _ = load_embedding_model(ck / "untrained.pt")
    after, spec = load_embedding_model(ck / "last.pt")
    assert spec["backbone"] == "tiny" and spec["image_size"] == [32, 32]
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(before(x), after(x))
    full = load_checkpoint(ck / "last.pt")
    assert full["step"] == 8 and full["data_position"]["batch"] >= 1 and "optimizer" in full


def test_tiny_backbone_overfits_a_few_identities(tmp_path):
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path / "run",
            steps=60,
            **{
                "logging.every_steps": 10,
                "checkpoint.every_steps": 100,
                "schedule.warmup_steps": 5,
                "data.synthetic.noise": 0.3,
            },
        ),
    )
    summary = train(cfg)
    rows = metrics(tmp_path / "run")
    assert rows[-1]["batch_acc"] >= 0.95, rows[-1]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert summary["step"] == 60


@needs_grad_dtype
def test_bf16_head_gradient_trains_like_fp32(tmp_path, monkeypatch):
    """head.grad_dtype=bfloat16 (the chunked engine on the CPU: torch's step over an fp32 copy of the
    gradient, the clip's norm in fp32): every step's head gradient is bf16, the loss falls as the
    float32 run's does from the same start, and the checkpoint's momentum stays fp32."""
    from trainer import head_parallel

    seen = []
    step = head_parallel.optimizer_step

    def spy(optimizer, head, step_fn):
        seen.append(head.weight.grad.dtype)
        step(optimizer, head, step_fn)

    monkeypatch.setattr(head_parallel, "optimizer_step", spy)
    losses = {}
    for grad_dtype in ("float32", "bfloat16"):
        run = tmp_path / grad_dtype
        extra = {"logging.every_steps": 10, "checkpoint.every_steps": 100, "schedule.warmup_steps": 5}
        extra.update(
            {"data.synthetic.noise": 0.3, "optim.clip_grad_norm": 5.0, "head.grad_dtype": grad_dtype}
        )
        train(load_config(None, tiny_overrides(run, steps=40, **extra)))
        assert seen == [getattr(torch, grad_dtype)] * 40, grad_dtype
        seen.clear()
        losses[grad_dtype] = [r["loss"] for r in metrics(run)]
        head = load_checkpoint(run / "checkpoints" / "last.pt")["head_state"]["rows"]
        assert head["optim.momentum_buffer"].dtype == torch.float32
    fp32, bf16 = losses["float32"], losses["bfloat16"]
    assert bf16[0] == pytest.approx(fp32[0], rel=0.1), (fp32, bf16)  # the first 10 steps' mean
    assert fp32[-1] < 0.05 * fp32[0] and bf16[-1] < 0.05 * bf16[0], (fp32, bf16)


def test_compiled_run_compiles_the_backbone_a_bounded_number_of_times(tmp_path):
    """model.compile=true compiles the backbone alone: 20 steps over 5 epochs with a head whose
    margin changes every step (sphereface annealing) compile a few graphs, not one per step, and the
    checkpoint's backbone keys are the plain ones."""
    from torch._dynamo import register_backend

    graphs = []

    @register_backend
    def facetrain_counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    run = tmp_path / "run"
    cfg = load_config(
        None,
        tiny_overrides(
            run,
            steps=20,
            **{
                "model.compile": "true",
                "model.compile_backend": "facetrain_counting_backend",
                "head.margin": "sphereface",
                "head.m": 4,
                "head.s": 30.0,
                "head.impl": "chunked",
            },
        ),
    )
    summary = train(cfg)
    assert summary["step"] == 20 and summary["skipped_total"] == 0
    assert 1 <= len(graphs) <= 4, len(graphs)  # forward graph(s) of the backbone; not 20
    for gm in graphs:  # each one the backbone's forward (its image input), none the margin head's
        inputs = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
        assert "L_x_" in inputs and not any(name.startswith("L_labels") for name in inputs)
    state = load_checkpoint(run / "checkpoints" / "last.pt")["backbone_state"]
    assert state and not any("_orig_mod" in k for k in state)
    assert len({r["loss"] for r in metrics(run)}) > 1


def test_unknown_compile_backend_is_one_line(tmp_path):
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path / "run", steps=2, **{"model.compile": "true", "model.compile_backend": "no_such_backend"}
        ),
    )
    with pytest.raises(UserError, match="model.compile_backend='no_such_backend'"):
        train(cfg)


def test_nonfinite_loss_is_skipped_and_counted(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(run, steps=6))
    summary = train(cfg, hooks=FaultHooks(nonfinite_steps=[2]))
    assert summary["skipped_total"] == 1
    rows = metrics(run)
    assert all(r["loss"] is None or r["loss"] == r["loss"] for r in rows)  # no NaN logged as a loss
    assert [r["skipped_total"] for r in rows] == [0, 0, 1, 1, 1, 1]
    state = load_checkpoint(run / "checkpoints" / "last.pt")["backbone_state"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_divergence_stops_with_a_message_and_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    args = tiny_overrides(run, steps=20, **{"optim.max_nonfinite_in_row": 3})
    assert main(args, hooks=FaultHooks(nonfinite_steps=[3, 4, 5, 6])) == 3
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: 3 non-finite steps in a row at step 6"), last
    ckpt = load_checkpoint(run / "checkpoints" / "diverged-step-00000006.pt")  # never a resume candidate
    assert ckpt["metrics"]["diverged"] is True and ckpt["metrics"]["skipped_total"] == 3
    assert not (run / "checkpoints" / "step-00000006.pt").exists()


def test_no_weight_decay_on_norms_biases_and_prelu():
    model = build_backbone("tiny", 16, (32, 32), width=8)
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    n_norm = sum(1 for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.PReLU)))
    assert len(no_decay["params"]) >= n_norm


@pytest.mark.parametrize("decay", ["cosine", "poly", "step", "constant"])
def test_schedule_warms_up_then_decays(decay):
    cfg = ScheduleConfig(steps=100, warmup_steps=10, decay=decay, milestones=[0.5], gamma=0.1)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in zip(f[:10], f[1:10]))  # rising during warm-up
    if decay == "constant":
        assert f[-1] == 1.0
    else:
        assert all(a >= b - 1e-12 for a, b in zip(f[10:], f[11:]))  # never rising after
        assert f[-1] < 0.15
    if decay == "step":
        assert f[49] == 1.0 and f[50] == pytest.approx(0.1)


def test_trainer_builds_the_fused_sgd_and_torch_adamw() -> None:
    head, backbone = MarginHead(30, 8, "cosface"), torch.nn.Linear(8, 8)
    sgd = build_optimizer(backbone, head, OptimConfig(momentum=0.9, nesterov=True))
    assert type(sgd) is FusedHeadSGD and sgd.head is head and sgd.param_groups[-1]["nesterov"]
    assert type(build_optimizer(backbone, head, OptimConfig(name="adamw"))) is torch.optim.AdamW
