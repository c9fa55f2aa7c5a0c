"""eval/verification/metrics.py and the evaluators: non-finite embeddings are refused, never scored
as chance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from eval.lfw import main
from eval.verification.metrics import NonFiniteEmbeddings, check_finite, pair_scores
from models.model_file import save_embedding_checkpoint
from tests._eval_util import build_lfw_shards, make_checkpoint, one_line_error


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_names_the_count_and_the_first_face(bad: float) -> None:
    emb = np.ones((5, 4), np.float32)
    emb[3, 1] = bad
    emb[4, 0] = bad
    with pytest.raises(NonFiniteEmbeddings, match=r"2 of 5 embeddings .*\(first: 'd'\)"):
        check_finite(emb, dict(zip("abcde", range(5), strict=True)))
    check_finite(np.ones((5, 4)), {})  # finite: no error
    with pytest.raises(NonFiniteEmbeddings):  # the scoring itself checks
        pair_scores(emb, dict(zip("abcde", range(5), strict=True)), [])


def test_lfw_refuses_a_nan_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What a diverged run leaves behind: NaN weights; before, the protocol said 0.5000, exit 0. The model
    loader refuses the weights (models/model_file.py) before any embedding is computed."""
    shards = build_lfw_shards(tmp_path / "lfw")
    good = make_checkpoint(tmp_path / "good.pt")
    ckpt = torch.load(good, weights_only=True)
    state = {
        k: (v.fill_(float("nan")) if v.is_floating_point() else v) for k, v in ckpt["backbone_state"].items()
    }
    nan = tmp_path / "nan.pt"
    save_embedding_checkpoint(nan, ckpt["model"], state)
    code = main(["--checkpoint", str(nan), "--shards", str(shards), "--quiet"])
    captured = capsys.readouterr()
    one_line_error(code, captured.err, str(nan), "weight tensors are NaN or infinite")
    assert "LFW ACC" not in captured.out
