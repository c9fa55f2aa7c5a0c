"""eval/lfw.py on small hand-built LFW shards: the full run against the protocol computed by hand, its
output line and JSON, flip TTA, pairs files, and one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from eval.lfw import main
from eval.verification.embed_keys import embed_keys
from eval.verification.pairsets import set_pairs
from eval.verification.shard_faces import read_jpeg, sample_table, shard_jpegs
from models.model_file import load_embedding_model
from shards.manifest import load_manifest, write_manifest
from tests._eval_util import METRIC_KEYS, SIZE, build_lfw_shards, make_checkpoint, one_line_error

ROOT = Path(__file__).resolve().parents[2]
LFW_KEYS = {"fold_accuracies", "fold_thresholds", "flip", "model", "shards"}  # lfw.py's own, since its start
LINE = re.compile(
    r"^LFW ACC: \d\.\d{4} \+- \d\.\d{4}  \(same: \d\.\d{4}, diff: \d\.\d{4}\)  "
    r"AUC \d\.\d{4}  threshold -?\d\.\d{4}  TAR@FAR=1e-3 \d\.\d{3}$"
)


@pytest.fixture(scope="module")
def lfw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lfw_shards(tmp_path_factory.mktemp("lfw") / "shards")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _protocol_by_hand(shards: Path, ckpt: Path) -> dict[str, float]:
    """The accuracies the data must give, computed without the evaluator's code: OpenCV decode, the
    model on a face plus its mirror, cosine scores, then for each fold every candidate threshold
    tried on the other nine folds (ties to the lowest) and applied to the held-out fold."""
    manifest = load_manifest(shards)
    members = shard_jpegs(manifest)
    model, _ = load_embedding_model(ckpt)
    keys = sorted(members)
    bgr = [cv2.imdecode(np.frombuffer(read_jpeg(members[k]), np.uint8), cv2.IMREAD_COLOR) for k in keys]
    x = torch.from_numpy(np.stack([im[..., ::-1] for im in bgr]).copy()).permute(0, 3, 1, 2).float()
    x = x / 127.5 - 1
    with torch.no_grad():
        emb = (model(x) + model(torch.flip(x, dims=[3]))).double().numpy()
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    row = {k: i for i, k in enumerate(keys)}
    pairs = manifest.pairs or []
    scores = np.array([emb[row[p.a]] @ emb[row[p.b]] for p in pairs])
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    accuracies, correct = [], np.zeros(len(pairs), bool)
    for f in range(10):
        train, test = folds != f, folds == f
        cuts = np.unique(scores[train])  # below all, between each two distinct scores, above all
        candidates = [cuts[0] - 1, *((cuts[:-1] + cuts[1:]) / 2), cuts[-1] + 1]
        best = max(candidates, key=lambda t: (np.mean((scores[train] > t) == same[train]), -t))
        correct[test] = (scores[test] > best) == same[test]
        accuracies.append(correct[test].mean())
    return {
        "accuracy_mean": float(np.mean(accuracies)),
        "same_accuracy": float(correct[same].mean()),
        "diff_accuracy": float(correct[~same].mean()),
    }


def test_full_run_writes_metrics_roc_and_failures(
    lfw_dir: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json, roc, fails = tmp_path / "m.json", tmp_path / "roc.png", tmp_path / "fail.png"
    code, out, err = _run(
        capsys,
        "--checkpoint",
        str(ckpt),
        "--shards",
        str(lfw_dir),
        "--json",
        str(out_json),
        "--roc",
        str(roc),
        "--failures",
        str(fails),
        "--batch-size",
        "7",
        "--quiet",
    )
    assert code == 0, err
    assert LINE.match(out.strip().splitlines()[-1]), out
    m = json.loads(out_json.read_text())
    assert METRIC_KEYS | LFW_KEYS <= set(m) and m["num_pairs"] == 60 and len(m["fold_accuracies"]) == 10
    assert len(m["fold_thresholds"]) == 10 and m["flip"] is True and m["shards"] == str(lfw_dir)
    assert m["model"] == f"{ckpt} (tiny)"
    assert 0.0 <= m["accuracy_mean"] <= 1.0 and 0.0 <= m["auc"] <= 1.0 and m["seconds"] > 0
    want = _protocol_by_hand(lfw_dir, ckpt)
    for key, value in want.items():
        assert m[key] == pytest.approx(value, abs=1e-9), key
    for png in (roc, fails):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert cv2.imread(str(png)).shape[0] > 100


def test_every_face_embedded_once_with_flip(lfw_dir: Path) -> None:
    seen: list[torch.Tensor] = []
    weights = torch.randn(3 * SIZE[0] * SIZE[1], 8, generator=torch.Generator().manual_seed(0))

    def linear(images: torch.Tensor) -> np.ndarray:
        seen.append(images.clone())
        return (images.flatten(1) @ weights).numpy()

    manifest = load_manifest(lfw_dir)
    table = sample_table(manifest)
    keys = list(table.keys or []) * 2  # a face named twice is still embedded once
    emb, index_of = embed_keys(linear, manifest, table, keys, batch_size=5, flip=True, show_progress=False)
    assert len(index_of) == emb.shape[0] == 36 and set(index_of) == set(shard_jpegs(manifest))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    images = []
    for batch in seen:  # each forward holds a batch and then its mirror image
        half = batch.shape[0] // 2
        torch.testing.assert_close(batch[half:], torch.flip(batch[:half], dims=[3]))
        images.append(batch[:half])
    x = torch.cat(images)
    want = ((x + torch.flip(x, dims=[3])).flatten(1) @ weights).numpy()  # linear: f(x) + f(mirror x)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, want, atol=1e-4)
    no_flip, _ = embed_keys(linear, manifest, table, keys, batch_size=64, flip=False, show_progress=False)
    assert not np.allclose(no_flip, emb, atol=1e-3)


def test_pairs_file_resolves_both_names(lfw_dir: Path, tmp_path: Path) -> None:
    manifest = load_manifest(lfw_dir)
    path = tmp_path / "pairs.txt"
    path.write_text(
        "2\t1\nPerson_A\t1\t2\nPerson_A\t1\tPerson_B\t3\nPerson_C\t2\t3\nPerson_C\t1\tPerson_D\t2\n"
    )
    pairs = set_pairs(manifest, set(shard_jpegs(manifest)), path).pairs
    assert [(p.a, p.b, p.same, p.fold) for p in pairs][:2] == [
        ("Person_A__Person_A_0001", "Person_A__Person_A_0002", True, 0),
        ("Person_A__Person_A_0001", "Person_B__Person_B_0003", False, 0),  # the second name, not the first
    ]
    assert [p.fold for p in pairs] == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "content, where, what",
    [
        ("1\t1\nPerson_A\t1\t2\nPerson_A\t1\tPerson_B\t3\t4\n", ":3:", "5 fields"),
        ("1\t1\nPerson_A\t1\nPerson_A\t1\tPerson_B\t3\n", ":2:", "2 fields"),
        ("1\t1\nPerson_A\t1\t2\nPerson_A\t1\tPerson_Z\t3\n", ":3:", "Person_Z__Person_Z_0003"),
        ("1\t1\nPerson_A\tone\t2\nPerson_A\t1\tPerson_B\t3\n", ":2:", "integers"),
        ("ten\t1\n", ":1:", "header"),
        ("1\t2\nPerson_A\t1\t2\nPerson_A\t1\tPerson_B\t3\n", ":1:", "2 pair lines"),
    ],
)
def test_malformed_pairs_file_is_one_line(
    lfw_dir: Path,
    ckpt: Path,
    tmp_path: Path,
    content: str,
    where: str,
    what: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text(content)
    code, _, err = _run(capsys, "--checkpoint", str(ckpt), "--shards", str(lfw_dir), "--pairs", str(path))
    one_line_error(code, err, f"{path}{where}", what)


def test_unknown_key_in_manifest_pairs(
    lfw_dir: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in lfw_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = json.loads((bad / "manifest.json").read_text())
    data["pairs"][7]["b"] = "Nobody__Nobody_0001"
    write_manifest(bad, data)
    code, _, err = _run(capsys, "--checkpoint", str(ckpt), "--shards", str(bad))
    one_line_error(code, err, str(bad / "manifest.json"), "pairs[7]", "Nobody__Nobody_0001")
    (bad / "lfw-000001.tar").unlink()
    code, _, err = _run(capsys, "--checkpoint", str(ckpt), "--shards", str(bad))
    one_line_error(code, err, str(bad / "lfw-000001.tar"), "missing")


def test_wrong_checkpoints_are_one_line(
    lfw_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, other)  # some other project's checkpoint
    code, _, err = _run(capsys, "--checkpoint", str(other), "--shards", str(lfw_dir))
    one_line_error(code, err, str(other))
    small = make_checkpoint(tmp_path / "small.pt", size=(56, 56))
    code, _, err = _run(capsys, "--checkpoint", str(small), "--shards", str(lfw_dir))
    one_line_error(code, err, str(small), "(56, 56)")
    missing = tmp_path / "nope.pt"
    code, _, err = _run(capsys, "--checkpoint", str(missing), "--shards", str(lfw_dir))
    one_line_error(code, err, str(missing))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not onnx")
    code, _, err = _run(capsys, "--onnx", str(garbage), "--shards", str(lfw_dir))
    one_line_error(code, err, str(garbage))
    code, _, err = _run(capsys, "--checkpoint", str(missing), "--shards", str(tmp_path / "none"))
    one_line_error(code, err, "manifest")


def test_script_runs_as_a_file(lfw_dir: Path) -> None:
    """`python eval/lfw.py` with plain imports: --help works and a user error is one line, exit 2."""
    help_ = subprocess.run(
        [sys.executable, "eval/lfw.py", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert help_.returncode == 0 and "--onnx" in help_.stdout
    bad = subprocess.run(
        [sys.executable, "eval/lfw.py", "--checkpoint", "/nonexistent.pt", "--shards", str(lfw_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: /nonexistent.pt")
    assert "Traceback" not in bad.stderr


def test_garbage_shard_or_index_is_one_line(
    lfw_dir: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(lfw_dir, bad)
    tar, idx = bad / "lfw-000001.tar", bad / "lfw-000001.idx"
    good_idx = idx.read_bytes()
    idx.write_bytes(np.random.default_rng(0).integers(0, 256, len(good_idx), np.uint8).tobytes())
    code, _, err = _run(capsys, "--checkpoint", str(ckpt), "--shards", str(bad))
    one_line_error(code, err, str(idx), "DALI index")
    idx.write_bytes(good_idx)
    tar.write_bytes(np.random.default_rng(1).integers(0, 256, tar.stat().st_size, np.uint8).tobytes())
    code, _, err = _run(capsys, "--checkpoint", str(ckpt), "--shards", str(bad), "--quiet")
    one_line_error(code, err, str(tar), "bad tar header")
