"""eval/import_insightface.py against embeddings InsightFace's own code gave (tests/data/insightface),
the imported file in eval and the trainer (model.init_from, optim.backbone_lr_mult)."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from common.cli import UserError
from eval.export_onnx import main as export_main
from eval.import_insightface import ARCHS, convert, fitting_archs
from eval.import_insightface import main as import_main
from models.backbones import build_backbone
from models.load import load_model
from models.model_file import save_embedding_checkpoint
from tests._insightface_util import FIXTURE, fixed_input, their_state
from tests._trainer_util import backbone_state, metrics, run_main, tiny_overrides
from trainer.config import OptimConfig, ScheduleConfig
from trainer.optim import Schedule, build_optimizer

MIN_COSINE = 0.9999


@cache
def fixture() -> dict:
    return torch.load(FIXTURE, weights_only=True)["archs"]


def ours(arch: str, theirs: dict[str, torch.Tensor]) -> torch.nn.Module:
    state, size = convert(theirs, arch, "fixture")
    backbone, kwargs, _ = ARCHS[arch]
    model = build_backbone(backbone, size, (112, 112), **kwargs)
    model.load_state_dict(state)
    return model.eval()


def cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return torch.nn.functional.cosine_similarity(a, b).tolist()


# r100, r200, vit_s, vit_b, vit_l together take 40 s on 2 idle cores (vit_l 23 s; each 15-41 s on busy
# ones) and up to 2 GB: the mapping of r18-r50 / vit_t at other sizes (their layouts are checked below
# for every arch); FACETRAIN_LONG_TESTS=1 runs them too.
BIG = pytest.mark.skipif(
    os.environ.get("FACETRAIN_LONG_TESTS") != "1",
    reason="FACETRAIN_LONG_TESTS=1 not set: big networks' forward passes (40 s, 2 GB)",
)


@pytest.mark.parametrize(
    "arch",
    ["r18", "r34", "r50", "mbf", "vit_t"]
    + [pytest.param(arch, marks=BIG) for arch in ("r100", "r200", "vit_s", "vit_b", "vit_l")],
)
def test_embeddings_equal_insightface_code(arch):
    case = fixture()[arch]
    with torch.no_grad():
        got = ours(arch, their_state(case["layout"], case["seed"]))(fixed_input(case["seed"]))
    assert min(cosines(got, case["embeddings"])) >= MIN_COSINE


def layout_only(arch: str) -> dict[str, torch.Tensor]:
    """Their state dict's names and shapes, no numbers (meta tensors: instant even for r200)."""
    return {
        name: torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device="meta")
        for name, shape, dtype in fixture()[arch]["layout"]
    }


def test_each_of_their_layouts_fits_its_arch_and_no_other():
    fits = {arch: fitting_archs(layout_only(arch)) for arch in fixture()}
    assert fits == {arch: [arch] for arch in ARCHS}
    with pytest.raises(UserError, match=r"not InsightFace's r34 \(.*\); it fits --arch r18$"):
        convert(layout_only("r18"), "r34", "backbone.pth")


def test_the_fixture_sees_the_batchnorm_statistics():
    """The agreement above could fail: mbf without its trained BatchNorm statistics (the identity)
    gives other embeddings."""
    case = fixture()["mbf"]
    theirs = their_state(case["layout"], case["seed"])
    for name in theirs:
        if name.endswith("running_mean"):
            theirs[name] = torch.zeros_like(theirs[name])
        elif name.endswith("running_var"):
            theirs[name] = torch.ones_like(theirs[name])
    with torch.no_grad():
        got = ours("mbf", theirs)(fixed_input(case["seed"]))
    assert max(cosines(got, case["embeddings"])) < 0.99


@cache
def mbf_weights(folder: Path) -> Path:
    """Their mbf backbone.pth (the fixture's weights), as their trainer saves it: a plain state dict."""
    case = fixture()["mbf"]
    path = folder / "backbone.pth"
    torch.save(their_state(case["layout"], case["seed"]), path)
    return path


@pytest.fixture(scope="module")
def imported_mbf(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("insightface")
    out = folder / "mbf.pt"
    assert import_main(["--weights", str(mbf_weights(folder)), "--arch", "mbf", "--out", str(out)]) == 0
    return out


def test_imported_file_embeds_as_theirs_in_eval_and_onnx(imported_mbf, tmp_path):
    case = fixture()["mbf"]
    model = load_model(imported_mbf)  # what eval/lfw.py, verify, identify read with --model
    assert (model.backbone, model.embedding_size, model.image_size) == ("insightface_mbf", 512, (112, 112))
    got = torch.from_numpy(model.embed(fixed_input(case["seed"])))
    assert min(cosines(got, case["embeddings"])) >= MIN_COSINE
    # the export runs onnxruntime against PyTorch and fails above 1e-4
    assert (
        export_main(
            ["--model", str(imported_mbf), "--out", str(tmp_path / "mbf.onnx"), "--check-batches", "2"]
        )
        == 0
    )


def one_error_line(capsys, weights: Path, arch: str) -> str:
    """The one stderr line of a refused import (and no file written)."""
    out = weights.parent / "refused.pt"
    assert import_main(["--weights", str(weights), "--arch", arch, "--out", str(out)]) == 2
    assert not out.exists()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_wrong_arch_is_one_line_naming_the_right_one(imported_mbf, capsys):
    weights = mbf_weights(imported_mbf.parent)
    line = one_error_line(capsys, weights, "r50")
    assert "not InsightFace's r50" in line and "--arch mbf" in line


@pytest.mark.parametrize("content", ["list", "text"])
def test_a_file_that_is_not_a_state_dict_is_one_line(content, capsys, tmp_path):
    weights = tmp_path / "backbone.pth"
    if content == "list":
        torch.save([1, 2, 3], weights)
    else:
        weights.write_text("not weights")
    line = one_error_line(capsys, weights, "r18")
    assert str(weights) in line


class _RunsCode:
    """Unpickling this calls `Path.touch(marker)`: what a hostile backbone.pth could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_with_code_is_refused_never_run(capsys, tmp_path):
    marker, weights = tmp_path / "ran", tmp_path / "backbone.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _RunsCode(marker)}, weights)
    line = one_error_line(capsys, weights, "r18")
    assert "not a loadable PyTorch weights file" in line
    assert not marker.exists()


def mbf_run(run_dir: Path, init_from: Path, **extra: object) -> list[str]:
    """Two steps of insightface_mbf on the synthetic identities at their 112x112, from `init_from`."""
    items = tiny_overrides(
        run_dir,
        steps=2,
        **{
            "data.synthetic.image_size": "[112,112]",
            "model.backbone": "insightface_mbf",
            "model.embedding_size": 512,
            "loader.batch_size": 8,
            "checkpoint.save_untrained": "true",
            "model.init_from": str(init_from),
            **extra,
        },
    )
    return [item for item in items if not item.startswith("model.kwargs.width=")]  # tiny's option


def test_init_from_trains_from_the_imported_weights(imported_mbf, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_main(mbf_run(run_dir, imported_mbf, **{"optim.backbone_lr_mult": 0.5}), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = backbone_state(imported_mbf)
    start = backbone_state(run_dir / "checkpoints" / "untrained.pt")
    assert imported.keys() == start.keys()
    assert all(torch.equal(imported[k], start[k]) for k in imported)
    trained = backbone_state(run_dir / "checkpoints" / "last.pt")
    assert not torch.equal(trained["head.proj.weight"], imported["head.proj.weight"])
    steps = [m for m in metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps][-1] == 2 and all(np.isfinite(m["loss"]) for m in steps)


def test_init_from_a_training_checkpoint(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_main(tiny_overrides(first, steps=2)).returncode == 0
    trained = first / "checkpoints" / "last.pt"
    proc = run_main(
        tiny_overrides(
            second, steps=2, **{"model.init_from": str(trained), "checkpoint.save_untrained": "true"}
        )
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    start, saved = backbone_state(second / "checkpoints" / "untrained.pt"), backbone_state(trained)
    assert all(torch.equal(start[k], saved[k]) for k in saved)
    # a diverged run's file (NaN weights) is refused in one line, before any step
    ckpt = torch.load(trained, weights_only=True)
    nan_state = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in saved.items()
    }
    nan = tmp_path / "diverged.pt"
    save_embedding_checkpoint(nan, ckpt["model"], nan_state)
    proc = run_main(tiny_overrides(tmp_path / "third", steps=2, **{"model.init_from": str(nan)}))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "model.init_from" in lines[0] and "NaN or infinite" in lines[0]


def test_init_from_another_arch_is_one_line(imported_mbf, tmp_path):
    proc = run_main(tiny_overrides(tmp_path / "run", steps=2, **{"model.init_from": str(imported_mbf)}))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "model.init_from" in lines[0] and "insightface_mbf at embedding_size 512" in lines[0]
    assert "tiny at embedding_size 32" in lines[0]


def test_backbone_lr_mult_scales_the_backbones_groups_only():
    backbone = build_backbone("ir_small", 32, (32, 32), fixed_feature_scale=True)
    head = torch.nn.Linear(32, 8)
    optimizer = build_optimizer(backbone, head, OptimConfig(lr=0.2, backbone_lr_mult=0.1))
    schedule = Schedule(optimizer, 0.2, 10, ScheduleConfig(steps=10, decay="cosine"))
    schedule.advance()
    ids = {id(p) for p in backbone.parameters()}
    rates = [(all(id(p) in ids for p in g["params"]), g["lr"]) for g in optimizer.param_groups]
    assert [r for is_backbone, r in rates if is_backbone] == pytest.approx([0.1 * schedule.lr] * 2)
    assert [r for is_backbone, r in rates if not is_backbone] == pytest.approx([schedule.lr] * 2)
    assert 0 < schedule.lr < 0.2
    # the fixed-scale embedding BatchNorm (InsightFace's) is never trained
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(backbone.features.weight) not in trained and id(backbone.features.bias) in trained


def test_import_prints_the_spec(imported_mbf, capsys):
    out = imported_mbf.parent / "again.pt"
    assert (
        import_main(["--weights", str(mbf_weights(imported_mbf.parent)), "--arch", "mbf", "--out", str(out)])
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["backbone"] == "insightface_mbf" and printed["params"] == sum(
        p.numel() for p in build_backbone("insightface_mbf", 512).parameters()
    )
