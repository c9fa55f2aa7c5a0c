"""`validation.sets` in training: each set logged, best.pt picked by the mean or a named set, and the
figure logged for a set is the one eval/verify.py prints for the same checkpoint."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from common.cli import UserError
from eval.import_bin import main as import_main
from eval.verification.shard_faces import read_jpeg, shard_jpegs
from eval.verification.validation import VerificationValidator
from eval.verify import main as verify_main
from shards.manifest import load_manifest
from tests._loader_util import make_shards
from tests._trainer_util import metrics, pair_shards, tiny_overrides
from trainer.config import load_config
from trainer.main import main as train_main


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sets")
    a = pair_shards(root / "a", 0, dataset="pairs")
    # The second set is the first's pairs as an imported InsightFace pack: the .bin path end to end.
    m = load_manifest(a)
    where = shard_jpegs(m)
    pack = root / "b.bin"
    pack.write_bytes(
        pickle.dumps(
            ([read_jpeg(where[k]) for p in m.pairs for k in (p.a, p.b)], [p.same for p in m.pairs]),
            protocol=2,
        )
    )
    assert import_main(["--bin", str(pack), "--out", str(root / "b")]) == 0
    return {"a": a, "b": root / "b", "c": pair_shards(root / "c", 3, dataset="pairs")}


def test_config_reads_sets_and_checks_best(sets: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path / "r",
            **{
                "validation.sets.a": str(sets["a"]),
                "validation.sets.c": str(sets["c"]),
                "validation.best": "c",
            },
        ),
    )
    assert cfg.validation.sets == {"a": str(sets["a"]), "c": str(sets["c"])} and cfg.validation.best == "c"
    with pytest.raises(UserError, match=r"'validation.best' must be mean or one of a, got 'x'"):
        load_config(
            None,
            tiny_overrides(tmp_path / "r", **{"validation.sets.a": str(sets["a"]), "validation.best": "x"}),
        )
    with pytest.raises(UserError, match="unknown config key 'validation.sett'"):
        load_config(None, tiny_overrides(tmp_path / "r", **{"validation.sett": "{}"}))


def test_a_set_without_pairs_fails_before_training(tmp_path: Path) -> None:
    plain = make_shards(tmp_path / "train", [8], size=32)
    with pytest.raises(UserError, match="hold no pairs"):
        VerificationValidator({"x": plain})


def _verify(ckpt: Path, sets: dict[str, Path], out: Path) -> dict:
    argv = [
        "--checkpoint",
        str(ckpt),
        "--sets",
        *(f"{n}={d}" for n, d in sets.items()),
        "--json",
        str(out),
        "--quiet",
    ]
    assert verify_main(argv) == 0
    return json.loads(out.read_text())["sets"]


@pytest.mark.parametrize("best", ["mean", "c"])
def test_training_logs_each_set_as_eval_verify_prints_it(
    sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], best: str
) -> None:
    run = tmp_path / "run"
    extra = {f"validation.sets.{n}": str(d) for n, d in sets.items()}
    args = tiny_overrides(
        run,
        steps=6,
        **extra,
        **{"validation.every_steps": 3, "validation.batch_size": 16, "validation.best": best},
    )
    assert train_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    vals = [r for r in metrics(run) if "val_accuracy" in r]
    assert [r["step"] for r in vals] == [3, 6]
    last = vals[-1]
    assert {"a_accuracy_mean", "b_auc", "c_tar_at_far_1e-3", "sets_mean_accuracy"} <= set(last)
    want = (last["a_accuracy_mean"] + last["b_accuracy_mean"] + last["c_accuracy_mean"]) / 3
    picked = want if best == "mean" else last["c_accuracy_mean"]
    assert last["val_accuracy"] == pytest.approx(picked, abs=1e-12)
    assert summary["best_accuracy"] == max(r["val_accuracy"] for r in vals)
    # The same faces as a pack and as shards: one figure.
    assert last["a_accuracy_mean"] == last["b_accuracy_mean"]
    printed = _verify(run / "checkpoints" / "last.pt", sets, tmp_path / "v.json")
    for name in sets:
        assert last[f"{name}_accuracy_mean"] == printed[name]["accuracy_mean"], name
        for k in ("auc", "threshold", "accuracy_std"):
            assert last[f"{name}_{k}"] == pytest.approx(printed[name][k], abs=1e-6), (name, k)
