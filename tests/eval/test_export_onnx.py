"""eval/export_onnx.py: dynamic batch, metadata, onnxruntime parity, lfw.py --onnx = the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from eval import export_onnx
from eval.lfw import main as lfw_main
from models.model_file import load_embedding_model
from tests._eval_util import build_lfw_shards, make_checkpoint, one_line_error


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("onnx")
    ckpt = make_checkpoint(d / "tiny.pt", seed=3)
    assert export_onnx.main(["--checkpoint", str(ckpt), "--out", str(d / "tiny.onnx")]) == 0
    return ckpt, d / "tiny.onnx"


def test_export_has_dynamic_batch_metadata_and_matches(
    exported: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, path = exported
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["image_size"] == "112,112" and meta["color"] == "RGB" and meta["layout"] == "NCHW"
    assert meta["normalization"] == "(pixel / 255 - 0.5) / 0.5" and meta["embedding_size"] == "32"
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # symbolic batch
    model, _ = load_embedding_model(ckpt)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 3, 112, 112) * 2 - 1
    ref = model(x).detach().numpy()
    assert np.abs(ref).max() > 0.1  # a meaningful scale for the absolute tolerance
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, atol=1e-4)


def test_export_reports_and_fails_on_mismatch(
    exported: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt, _ = exported
    other = make_checkpoint(tmp_path / "other.pt", seed=4)
    real_export = export_onnx.export

    def export_other(model: torch.nn.Module, spec: dict, out: Path, opset: int = 18) -> None:
        real_export(load_embedding_model(other)[0], spec, out, opset)  # a different network's weights

    monkeypatch.setattr(export_onnx, "export", export_other)
    code = export_onnx.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "bad.onnx")])
    err = capsys.readouterr()
    report = json.loads(err.out.strip().splitlines()[-1])
    assert report["max_abs_diff"] > 1e-4
    one_line_error(code, err.err, str(tmp_path / "bad.onnx"), "differs from PyTorch")


def test_lfw_onnx_gives_the_checkpoint_accuracy(
    exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, path = exported
    shards = build_lfw_shards(tmp_path / "lfw", seed=1)
    results = []
    for flag, model in (("--checkpoint", ckpt), ("--onnx", path)):
        out = tmp_path / f"{flag[2:]}.json"
        assert lfw_main([flag, str(model), "--shards", str(shards), "--json", str(out), "--quiet"]) == 0
        results.append(json.loads(out.read_text()))
    a, b = results
    for key in ("accuracy_mean", "accuracy_std", "same_accuracy", "diff_accuracy", "tar_at_far_1e-3"):
        assert a[key] == b[key], key
    assert a["auc"] == pytest.approx(b["auc"], abs=1e-6)
    assert a["threshold"] == pytest.approx(b["threshold"], abs=1e-4)


def test_export_bad_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"junk")
    code = export_onnx.main(["--checkpoint", str(bad), "--out", str(tmp_path / "x.onnx")])
    one_line_error(code, capsys.readouterr().err, str(bad))
