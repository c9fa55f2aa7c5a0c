"""trainer/engine.py under faults: a diverged state is never saved or resumed as if good; the
metrics log holds each step once after a resume."""

from __future__ import annotations

import pytest
import torch

from tests._trainer_faults import FaultHooks
from tests._trainer_util import metrics, tiny_overrides
from trainer.checkpoint import atomic_save, load_checkpoint
from trainer.main import main


def _finite(path) -> bool:
    ckpt = load_checkpoint(path)
    return all(
        bool(torch.isfinite(v).all())
        for part in ("backbone_state", "head_state")
        for v in ckpt[part].values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_divergence_then_the_advised_rerun(tmp_path, capsys):
    """optim.lr=1e6 diverges; the rerun the message advises never continues the diverged state."""
    run = tmp_path / "run"
    args = tiny_overrides(
        run,
        steps=10,
        **{"optim.max_nonfinite_in_row": 3, "checkpoint.every_steps": 2, "logging.display": "plain"},
    )
    assert main([*args, "optim.lr=1000000.0"]) == 3
    (line,) = _error_lines(capsys.readouterr().err)
    assert "training diverged" in line and "diverged-step-" in line and "never resumed from" in line
    ck = run / "checkpoints"
    diverged = sorted(ck.glob("diverged-step-*.pt"))
    assert len(diverged) == 1 and load_checkpoint(diverged[0])["metrics"]["diverged"] is True
    for path in ck.glob("step-*.pt"):  # only states of finite steps became resumable checkpoints
        assert _finite(path), path
    assert main([*args, "optim.lr=0.1", "checkpoint.resume=auto"]) == 0
    err = capsys.readouterr().err
    assert not _error_lines(err) and "done: 10 steps" in err
    assert load_checkpoint(ck / "last.pt")["step"] == 10 and _finite(ck / "last.pt")


def test_resume_passes_over_a_nonfinite_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_overrides(run, steps=8)) == 0
    ck = run / "checkpoints"
    bad = load_checkpoint(ck / "step-00000008.pt")
    name = next(k for k, v in bad["backbone_state"].items() if v.is_floating_point())
    bad["backbone_state"][name].view(-1)[0] = float("nan")
    atomic_save(bad, ck / "step-00000008.pt")
    (ck / "last.pt").unlink()
    capsys.readouterr()
    assert main(tiny_overrides(run, steps=10)) == 0
    err = capsys.readouterr().err
    assert f"not resuming from {ck / 'step-00000008.pt'}: backbone_state.{name} holds NaN" in err
    assert f"resumed from {ck / 'step-00000004.pt'} at step 4" in err
    atomic_save(bad, ck / "step-00000008.pt")
    code = main(tiny_overrides(run, steps=12, **{"checkpoint.resume": str(ck / "step-00000008.pt")}))
    (line,) = _error_lines(capsys.readouterr().err)
    assert code == 2 and "cannot resume" in line and f"backbone_state.{name} holds NaN" in line


@pytest.mark.parametrize("faulty", [[4, 5], [5]])
def test_a_run_ending_on_nonfinite_steps_is_not_done(tmp_path, capsys, faulty):
    """Fewer non-finite steps than the guard allows, but the last ones: no "done", no exit 0."""
    run = tmp_path / "run"
    assert main(tiny_overrides(run, steps=6), hooks=FaultHooks(nonfinite_steps=faulty)) == 3
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert f"the run ended on {len(faulty)} non-finite step(s) in a row" in line and "done:" not in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4  # the last finite checkpoint


def test_metrics_log_each_step_once_after_a_resume(tmp_path, capsys):
    """Item 8: the steps a resume repeats are logged once (49 records for 40 steps before)."""
    run = tmp_path / "run"
    assert main(tiny_overrides(run, steps=6)) == 0  # checkpoints at 4 and 6
    ck = run / "checkpoints"
    (ck / "step-00000006.pt").unlink()
    (ck / "last.pt").unlink()  # as if killed between the step-6 log record and its checkpoint
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"time": 1.0, "step": 7, "lo')  # and a record cut short by the kill
    capsys.readouterr()
    assert main(tiny_overrides(run, steps=8)) == 0
    assert "dropped 3 record(s) of steps after 4" in capsys.readouterr().err
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
