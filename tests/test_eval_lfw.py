"""eval/lfw.py on small hand-built LFW shards: the full run, flip TTA, outputs, and one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from eval import embed as E
from eval.lfw import main
from eval.pairs import read_pairs_file, shard_jpegs
from shards.format import FORMAT_NAME, FORMAT_VERSION, sample_key, scaled_template
from shards.manifest import load_manifest, write_manifest
from shards.writer import ShardWriter
from trainer.backbones import build_backbone
from trainer.checkpoint import save_embedding_checkpoint

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"accuracy_mean", "accuracy_std", "same_accuracy", "diff_accuracy", "auc",
               "threshold", "tar_at_far_1e-3", "num_pairs", "seconds"}
LINE = re.compile(r"^LFW ACC: \d\.\d{4} \+- \d\.\d{4}  \(same: \d\.\d{4}, diff: \d\.\d{4}\)  "
                  r"AUC \d\.\d{4}  threshold -?\d\.\d{4}  TAR@FAR=1e-3 \d\.\d{3}$")
NAMES = [f"Person_{c}" for c in "ABCDEFGHIJKL"]  # 12 identities x 3 images
SIZE = (112, 112)


def _face(rng: np.random.Generator, ident: int) -> np.ndarray:
    """A coarse random pattern per identity (high contrast, so cosine scores spread) plus noise."""
    coarse = np.random.default_rng(1000 + ident).integers(0, 256, size=(6, 6, 3)).astype(np.uint8)
    base = cv2.resize(coarse, SIZE[::-1], interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0, 12, size=(*SIZE, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def build_lfw_shards(out: Path, seed: int = 0) -> Path:
    """36 faces over 2 shards, 60 pairs in 10 folds (3 genuine + 3 impostor each)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    samples = []
    for label, name in enumerate(NAMES):
        for i in (1, 2, 3):
            rel = f"{name}/{name}_{i:04d}.jpg"
            ok, jpg = cv2.imencode(".jpg", _face(rng, label), [cv2.IMWRITE_JPEG_QUALITY, 95])
            assert ok
            samples.append((sample_key(rel), jpg.tobytes(), label,
                            {"identity": name, "label": label, "source": rel, "landmarks": [[0, 0]] * 5}))
    order = rng.permutation(len(samples))
    infos = []
    for s, chunk in enumerate(np.array_split(order, 2)):
        w = ShardWriter(out / f"lfw-{s:06d}.tar")
        for j in chunk:
            w.add(*samples[j])
        infos.append(w.close())
    pairs = []
    for f in range(10):
        for k in range(3):
            n = NAMES[(f + k) % 12]
            pairs.append({"a": sample_key(f"{n}/{n}_0001.jpg"),
                          "b": sample_key(f"{n}/{n}_000{2 + k % 2}.jpg"), "same": True, "fold": f})
        for k in range(3):
            n1, n2 = NAMES[(f + k) % 12], NAMES[(f + k + 5) % 12]
            pairs.append({"a": sample_key(f"{n1}/{n1}_0001.jpg"), "b": sample_key(f"{n2}/{n2}_0003.jpg"),
                          "same": False, "fold": f})
    write_manifest(out, {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "dataset": "lfw", "split": "test",
        "num_samples": len(samples), "num_classes": len(NAMES), "classes": NAMES,
        "image_size": list(SIZE), "template": scaled_template(SIZE), "jpeg_quality": 95,
        "num_rejects": 0, "num_inputs": len(samples),
        "shards": [{"file": i.file, "index": i.index, "samples": i.samples, "bytes": i.bytes,
                    "sha256": i.sha256} for i in infos],
        "pairs": pairs, "seed": seed, "command": "tests/test_eval_lfw.py", "created_by": "tests",
    })
    return out


def make_checkpoint(path: Path, seed: int = 0, backbone: str = "tiny", size: tuple[int, int] = SIZE) -> Path:
    """A random tiny net whose BN statistics are calibrated on face-like images.

    Freshly initialized, the net outputs ~1e-8 in eval mode and every cosine is ~1; calibrated, the
    embeddings are centred and scores spread as they would for a trained net.
    """
    torch.manual_seed(seed)
    model = build_backbone(backbone, 32, size)
    rng = np.random.default_rng(seed)
    faces = np.stack([cv2.resize(_face(rng, i % len(NAMES)), size[::-1]) for i in range(48)])
    x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 127.5 - 1
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for chunk in x.split(16):
            model(chunk)
    spec = {"backbone": backbone, "embedding_size": 32, "image_size": list(size)}
    save_embedding_checkpoint(path, spec, model.state_dict())
    return path


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


def _one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_full_run_writes_metrics_roc_and_failures(lfw_dir: Path, ckpt: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out_json, roc, fails = tmp_path / "m.json", tmp_path / "roc.png", tmp_path / "fail.png"
    code, out, err = _run(capsys, "--checkpoint", str(ckpt), "--shards", str(lfw_dir),
                          "--json", str(out_json), "--roc", str(roc), "--failures", str(fails),
                          "--batch-size", "7", "--quiet")
    assert code == 0, err
    assert LINE.match(out.strip().splitlines()[-1]), out
    m = json.loads(out_json.read_text())
    assert METRIC_KEYS <= set(m) and m["num_pairs"] == 60 and len(m["fold_accuracies"]) == 10
    assert 0.0 <= m["accuracy_mean"] <= 1.0 and 0.0 <= m["auc"] <= 1.0 and m["seconds"] > 0
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
    emb, index_of = E.embed_shards(linear, manifest, batch_size=5, flip=True, show_progress=False)
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
    no_flip, _ = E.embed_shards(linear, manifest, batch_size=64, flip=False, show_progress=False)
    assert not np.allclose(no_flip, emb, atol=1e-3)


def test_pairs_file_resolves_both_names(lfw_dir: Path, tmp_path: Path) -> None:
    keys = shard_jpegs(load_manifest(lfw_dir))
    path = tmp_path / "pairs.txt"
    path.write_text("2\t1\nPerson_A\t1\t2\nPerson_A\t1\tPerson_B\t3\n"
                    "Person_C\t2\t3\nPerson_C\t1\tPerson_D\t2\n")
    pairs = read_pairs_file(path, keys)
    assert [(p.a, p.b, p.same, p.fold) for p in pairs][:2] == [
        ("Person_A__Person_A_0001", "Person_A__Person_A_0002", True, 0),
        ("Person_A__Person_A_0001", "Person_B__Person_B_0003", False, 0),  # the second name, not the first
    ]
    assert [p.fold for p in pairs] == [0, 0, 1, 1]


@pytest.mark.parametrize("content, where, what", [
    ("1\t1\nPerson_A\t1\t2\nPerson_A\t1\tPerson_B\t3\t4\n", ":3:", "5 fields"),
    ("1\t1\nPerson_A\t1\nPerson_A\t1\tPerson_B\t3\n", ":2:", "2 fields"),
    ("1\t1\nPerson_A\t1\t2\nPerson_A\t1\tPerson_Z\t3\n", ":3:", "Person_Z__Person_Z_0003"),
    ("1\t1\nPerson_A\tone\t2\nPerson_A\t1\tPerson_B\t3\n", ":2:", "integers"),
    ("ten\t1\n", ":1:", "header"),
    ("1\t2\nPerson_A\t1\t2\nPerson_A\t1\tPerson_B\t3\n", ":1:", "2 pair lines"),
])
def test_malformed_pairs_file_is_one_line(lfw_dir: Path, ckpt: Path, tmp_path: Path, content: str,
                                          where: str, what: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text(content)
    code, _, err = _run(capsys, "--checkpoint", str(ckpt), "--shards", str(lfw_dir), "--pairs", str(path))
    _one_line_error(code, err, f"{path}{where}", what)


def test_unknown_key_in_manifest_pairs(lfw_dir: Path, ckpt: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in lfw_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = json.loads((bad / "manifest.json").read_text())
    data["pairs"][7]["b"] = "Nobody__Nobody_0001"
    write_manifest(bad, data)
    code, _, err = _run(capsys, "--checkpoint", str(ckpt), "--shards", str(bad))
    _one_line_error(code, err, str(bad / "manifest.json"), "pairs[7]", "Nobody__Nobody_0001")
    (bad / "lfw-000001.tar").unlink()
    code, _, err = _run(capsys, "--checkpoint", str(ckpt), "--shards", str(bad))
    _one_line_error(code, err, str(bad / "lfw-000001.tar"), "missing")


def test_wrong_checkpoints_are_one_line(lfw_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, other)  # some other project's checkpoint
    code, _, err = _run(capsys, "--checkpoint", str(other), "--shards", str(lfw_dir))
    _one_line_error(code, err, str(other))
    small = make_checkpoint(tmp_path / "small.pt", size=(56, 56))
    code, _, err = _run(capsys, "--checkpoint", str(small), "--shards", str(lfw_dir))
    _one_line_error(code, err, str(small), "(56, 56)")
    missing = tmp_path / "nope.pt"
    code, _, err = _run(capsys, "--checkpoint", str(missing), "--shards", str(lfw_dir))
    _one_line_error(code, err, str(missing))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not onnx")
    code, _, err = _run(capsys, "--onnx", str(garbage), "--shards", str(lfw_dir))
    _one_line_error(code, err, str(garbage))
    code, _, err = _run(capsys, "--checkpoint", str(missing), "--shards", str(tmp_path / "none"))
    _one_line_error(code, err, "manifest")


def test_script_runs_as_a_file(lfw_dir: Path) -> None:
    """`python eval/lfw.py` with plain imports: --help works and a user error is one line, exit 2."""
    help_ = subprocess.run([sys.executable, "eval/lfw.py", "--help"], cwd=ROOT, capture_output=True,
                           text=True)
    assert help_.returncode == 0 and "--onnx" in help_.stdout
    bad = subprocess.run([sys.executable, "eval/lfw.py", "--checkpoint", "/nonexistent.pt", "--shards",
                          str(lfw_dir)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: /nonexistent.pt")
    assert "Traceback" not in bad.stderr
