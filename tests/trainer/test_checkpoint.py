"""Training checkpoints: RNG state, rotation, resume choice (the model part: tests/models/test_load.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from common.cli import UserError
from trainer.checkpoint import CheckpointDir, capture_rng, load_checkpoint, restore_rng

SPEC = {"backbone": "tiny", "embedding_size": 16, "image_size": [32, 32], "kwargs": {"width": 8}}


def test_rng_state_round_trip():
    state = capture_rng()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    restore_rng(state)
    second = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_rotation_keeps_last_k_and_best(tmp_path):
    ckdir = CheckpointDir(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        ckpt = {"format": "facetrain-checkpoint", "version": 1, "step": step}
        ckdir.save(ckpt, step, best=step == 20)
    assert [s for s, _ in ckdir.step_files()] == [20, 30]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 30
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 20


def test_resume_skips_partial_and_corrupt_files(tmp_path):
    ckdir = CheckpointDir(tmp_path, keep_last=3)
    ckdir.save({"format": "facetrain-checkpoint", "version": 1, "step": 5}, 5)
    # What a kill leaves: a temp file, and (on a filesystem without atomic rename) a torn step file.
    (tmp_path / "step-00000010.pt.tmp").write_bytes(b"PK\x03\x04 half")
    (tmp_path / "step-00000009.pt").write_bytes(b"PK\x03\x04 torn")
    path, ckpt = ckdir.newest_complete()
    assert ckpt["step"] == 5 and path.name == "step-00000005.pt"
    removed = ckdir.clean_partial()
    assert [p.name for p in removed] == ["step-00000010.pt.tmp"]
    assert CheckpointDir(tmp_path / "empty").newest_complete() is None


def test_resume_with_a_changed_run_says_what_differs(tmp_path, capsys):
    from tests._trainer_util import tiny_overrides
    from trainer.main import main

    run = tmp_path / "run"
    base = tiny_overrides(run, steps=4, **{"logging.tensorboard": "off"})
    assert main(base) == 0
    capsys.readouterr()
    cases = [
        ({"model.embedding_size": 16}, "model embedding_size 32 -> 16"),
        ({"model.kwargs.width": 16}, "model kwargs {'width': 8} -> {'width': 16}"),
        ({"data.synthetic.classes": 4}, "classes 8 -> 4"),
        (
            {"loader.batch_size": 8},
            "loader.batch_size x processes 16 x 1 -> 8 x 1 (to keep the global batch "
            "of 16 on 1 process(es), resume with loader.batch_size=16)",
        ),
    ]
    for change, fragment in cases:
        assert main(tiny_overrides(run, steps=8, **{"logging.tensorboard": "off", **change})) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert "step-00000004.pt: cannot resume: " + fragment in err and "it absorbs changes to optim" in err
    # What a resume absorbs: a new LR and schedule length continue from step 4.
    assert main(tiny_overrides(run, steps=6, **{"logging.tensorboard": "off", "optim.lr": 0.05})) == 0
    assert "resumed from" in capsys.readouterr().err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 6


def test_resume_on_another_process_count_keeps_the_global_batch(tmp_path):
    from trainer.checkpoint import check_resumable

    head = {"num_classes": 5, "rows": {"weight": torch.zeros(5, 16)}, "scalars": {}}
    ckpt = {
        "optimizer": {},
        "model": SPEC,
        "head_state": head,
        "config": {"loader": {"batch_size": 16}},
        "rng": {"per_rank": [{}, {}]},
    }
    check_resumable(tmp_path / "c.pt", ckpt, SPEC, 5, 16, 2)  # the same run: fine
    check_resumable(tmp_path / "c.pt", ckpt, SPEC, 5, 32, 1)  # 2 x 16 = 1 x 32: the same global batches
    with pytest.raises(UserError, match=r"c\.pt: cannot resume: loader\.batch_size x processes 16 x 2 -> "):
        check_resumable(tmp_path / "c.pt", ckpt, SPEC, 5, 16, 1)
    # A GPU lost: the message names the override that keeps the global batch, and it resumes.
    with pytest.raises(UserError) as info:
        check_resumable(tmp_path / "c.pt", ckpt, SPEC, 5, 16, 1)
    assert (
        "16 x 2 -> 16 x 1 (to keep the global batch of 32 on 1 process(es), resume with "
        "loader.batch_size=32)" in str(info.value)
    )
    three = {**ckpt, "rng": {"per_rank": [{}, {}, {}]}}  # 3 x 16 = 48: does not split over 5
    with pytest.raises(UserError) as info:
        check_resumable(tmp_path / "c.pt", three, SPEC, 5, 16, 5)
    assert (
        "(the global batch of 48 does not split over 5 processes; resume on 4 with "
        "loader.batch_size=12)" in str(info.value)
    )
    check_resumable(tmp_path / "c.pt", three, SPEC, 5, 12, 4)
    whole = {**ckpt, "head_state": {"weight": torch.zeros(5, 16)}}  # written before per-class heads
    with pytest.raises(UserError, match="its head was saved whole"):
        check_resumable(tmp_path / "c.pt", whole, SPEC, 5, 16, 2)
    with pytest.raises(UserError, match="embedding-only checkpoint"):
        check_resumable(tmp_path / "c.pt", {"model": SPEC}, SPEC, 5, 16, 1)
