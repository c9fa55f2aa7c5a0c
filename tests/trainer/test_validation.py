"""In-training LFW validation (eval/verification/validation.py, handed to the trainer by trainer/main.py): the
figure it logs is the one eval/lfw.py prints for the same checkpoint (same pairs, same flip rule,
same metric code), and validating leaves the training model as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.cli import UserError
from eval.lfw import main as lfw_main
from eval.verification.validation import VerificationValidator
from models.backbones import build_backbone
from models.model_file import save_embedding_checkpoint
from tests._loader_util import make_shards
from tests._trainer_util import metrics, pair_shards, tiny_overrides
from trainer.main import main as train_main


@pytest.fixture(scope="module")
def lfw(tmp_path_factory) -> Path:
    return pair_shards(tmp_path_factory.mktemp("lfw") / "shards")


def _eval_lfw(checkpoint: Path, shards: Path, out: Path) -> dict:
    assert (
        lfw_main(["--checkpoint", str(checkpoint), "--shards", str(shards), "--json", str(out), "--quiet"])
        == 0
    )
    return json.loads(out.read_text())


def test_validator_equals_eval_lfw_and_keeps_the_model_mode(lfw, tmp_path):
    model = build_backbone("tiny", 32, (32, 32), width=8)
    spec = {"backbone": "tiny", "embedding_size": 32, "image_size": [32, 32], "kwargs": {"width": 8}}
    save_embedding_checkpoint(tmp_path / "m.pt", spec, model.state_dict())
    want = _eval_lfw(tmp_path / "m.pt", lfw, tmp_path / "m.json")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = VerificationValidator({"lfw": lfw}, batch_size=7)(model)
    assert model.training  # back in the mode it came in
    for k, v in model.state_dict().items():  # eval mode while embedding: BN statistics untouched
        assert torch.equal(v, before[k]), k
    assert got["accuracy_mean"] == want["accuracy_mean"]
    assert got["num_pairs"] == want["num_pairs"] == 60
    for k in ("accuracy_std", "auc", "threshold", "same_accuracy", "diff_accuracy"):
        assert got[k] == pytest.approx(want[k], abs=1e-6), k


def test_training_logs_the_figure_eval_lfw_prints(lfw, tmp_path, capsys):
    run = tmp_path / "run"
    args = tiny_overrides(
        run,
        steps=6,
        **{"validation.lfw_shards": str(lfw), "validation.every_steps": 3, "validation.batch_size": 16},
    )
    assert train_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    vals = [r for r in metrics(run) if "val_accuracy" in r]
    assert [r["step"] for r in vals] == [3, 6]
    assert {
        "val_accuracy",
        "accuracy_std",
        "same_accuracy",
        "diff_accuracy",
        "auc",
        "tar_at_far_1e-3",
        "threshold",
        "num_pairs",
        "val_seconds",
    } <= set(vals[-1])
    assert not [k for k in vals[-1] if k.startswith(("lfw_", "sets_"))]  # one set: no prefixes
    assert summary["best_accuracy"] == max(r["val_accuracy"] for r in vals)
    want = _eval_lfw(run / "checkpoints" / "last.pt", lfw, tmp_path / "last.json")
    assert vals[-1]["val_accuracy"] == want["accuracy_mean"]


def test_lfw_shards_without_pairs_fail_before_training(tmp_path):
    plain = make_shards(tmp_path / "train", [8], size=32)
    with pytest.raises(UserError, match="hold no pairs"):
        VerificationValidator({"lfw": plain})
