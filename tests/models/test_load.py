"""models/: the embedding model file (models/model_file.py) and the one loader (models/load.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.cli import CliParser, UserError
from eval import export_onnx
from eval.ijb import main as ijb_main
from models.backbones import build_backbone
from models.load import add_model_arguments, load_model
from models.model_file import (
    load_checkpoint,
    load_embedding_model,
    read_model_file,
    save_embedding_checkpoint,
)
from tests._eval_util import make_checkpoint, one_line_error
from trainer.checkpoint import capture_rng

ROOT = Path(__file__).resolve().parents[2]
SPEC = {"backbone": "tiny", "embedding_size": 16, "image_size": [32, 32], "kwargs": {"width": 8}}


def _model():
    return build_backbone("tiny", 16, (32, 32), width=8)


def test_embedding_checkpoint_round_trip(tmp_path):
    model = _model()
    path = tmp_path / "m.pt"
    save_embedding_checkpoint(path, SPEC, model.state_dict(), step=7, rng=capture_rng())
    rebuilt, spec = load_embedding_model(path)
    assert spec == SPEC
    assert not rebuilt.training
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), rebuilt(x))
    raw = torch.load(path, weights_only=True)  # the contract: plain weights_only loading works
    assert raw["format"] == "facetrain-checkpoint" and raw["version"] == 1 and raw["step"] == 7
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_files_give_user_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt"):
        load_embedding_model(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="not found"):
        load_embedding_model(tmp_path / "none.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a facetrain-checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    wrong = dict(SPEC, embedding_size=32)
    save_embedding_checkpoint(tmp_path / "w.pt", wrong, _model().state_dict())
    with pytest.raises(UserError, match="do not fit"):
        load_embedding_model(tmp_path / "w.pt")


def test_a_checkpoint_and_its_onnx_export_give_the_same_embeddings(tmp_path):
    ckpt = make_checkpoint(tmp_path / "tiny.pt", seed=5)
    onnx_file = tmp_path / "exported.model"  # no suffix to go by: told apart by content
    assert export_onnx.main(["--model", str(ckpt), "--out", str(onnx_file)]) == 0
    torch_model, onnx_model = load_model(ckpt), load_model(onnx_file)
    assert (torch_model.kind, onnx_model.kind) == ("checkpoint", "onnx")
    assert torch_model.architecture == onnx_model.architecture == "tiny/32"
    assert torch_model.image_size == onnx_model.image_size == (112, 112)
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    a, b = torch_model.embed(x), onnx_model.embed(x)
    assert a.shape == (3, 32) and abs(a).max() > 0.1
    torch.testing.assert_close(torch.from_numpy(b), torch.from_numpy(a), atol=1e-4, rtol=1e-4)


def test_the_threshold_comes_without_the_training_state(tmp_path):
    path = tmp_path / "trained.pt"
    save_embedding_checkpoint(
        path,
        SPEC,
        _model().state_dict(),
        optimizer={"state": {0: torch.ones(3)}},
        metrics={"lfw_threshold": 0.42},
    )
    assert load_model(path).threshold == pytest.approx(0.42)
    assert read_model_file(path).threshold == pytest.approx(0.42)


# Loads a checkpoint that holds 64 MiB of optimizer state: the model part alone, then (the control
# that shows the measurement sees a full load) the whole dict; prints the resident-memory growth
# of each in MiB, with what was loaded still referenced.
_MEASURE = """
import os, sys
from models.model_file import load_checkpoint, read_model_file
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
start = rss()
model_file = read_model_file(sys.argv[1])
model = model_file.build()
model_only = rss() - start
ckpt = load_checkpoint(sys.argv[1])
print(model_only, rss() - start)
"""


def test_loading_for_evaluation_leaves_the_optimizer_state_on_disk(tmp_path):
    path = tmp_path / "big.pt"
    momentum = torch.ones(16, 2**20)  # 64 MiB
    save_embedding_checkpoint(path, SPEC, _model().state_dict(), optimizer={"momentum": momentum})
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    model_only_mib, full_mib = (float(v) for v in proc.stdout.split())
    assert full_mib > 56, (model_only_mib, full_mib)  # the full load reads the 64 MiB
    assert model_only_mib < 16, (model_only_mib, full_mib)


def test_a_file_that_is_neither_is_one_line(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list\n")
    with pytest.raises(UserError, match=r"notes\.txt: neither a facetrain checkpoint"):
        load_model(notes)
    code = ijb_main(["--model", str(notes), "--ijb", str(tmp_path)])  # the model is loaded first
    one_line_error(code, capsys.readouterr().err, str(notes), "neither")
    with pytest.raises(UserError, match=r"gone\.bin: model file not found"):
        load_model(tmp_path / "gone.bin")


def test_model_checkpoint_and_onnx_are_one_argument():
    parser = CliParser(prog="x")
    add_model_arguments(parser)
    for flag in ("--model", "--checkpoint", "--onnx"):
        assert parser.parse_args([flag, "m.pt"]).model == Path("m.pt")
    with pytest.raises(UserError, match="not allowed with"):
        parser.parse_args(["--model", "a.pt", "--onnx", "b.onnx"])
    only_checkpoints = CliParser(prog="y")
    add_model_arguments(only_checkpoints, onnx=False)
    assert only_checkpoints.parse_args(["--checkpoint", "m.pt"]).model == Path("m.pt")
    with pytest.raises(UserError, match="unrecognized arguments: --onnx"):
        only_checkpoints.parse_args(["--checkpoint", "m.pt", "--onnx", "m.onnx"])
