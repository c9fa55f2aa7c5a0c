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
from models.model_file import load_embedding_model, save_embedding_checkpoint
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
    ckpt, good = exported
    other = make_checkpoint(tmp_path / "other.pt", seed=4)
    real_export = export_onnx.export

    def export_other(model: torch.nn.Module, spec: dict, out: Path, opset: int = 18) -> None:
        real_export(load_embedding_model(other)[0], spec, out, opset)  # a different network's weights

    monkeypatch.setattr(export_onnx, "export", export_other)
    out = tmp_path / "bad.onnx"
    out.write_bytes(good.read_bytes())  # a good model from before: a failed export must not replace it
    code = export_onnx.main(["--checkpoint", str(ckpt), "--out", str(out)])
    err = capsys.readouterr()
    report = json.loads(err.out.strip().splitlines()[-1])
    assert report["max_abs_diff"] > 1e-4
    one_line_error(code, err.err, str(out), "differs from PyTorch", "not written")
    assert out.read_bytes() == good.read_bytes() and sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.onnx",
        "other.pt",
    ]


def _nan_checkpoint(good: Path, path: Path) -> Path:
    """What a diverged run saves: the same layout, every float weight NaN."""
    ckpt = torch.load(good, weights_only=True)
    state = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in ckpt["backbone_state"].items()
    }
    save_embedding_checkpoint(path, ckpt["model"], state)
    return path


def test_a_nan_checkpoint_is_refused_and_an_existing_export_kept(
    exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, good = exported
    nan = _nan_checkpoint(ckpt, tmp_path / "nan.pt")
    fresh, existing = tmp_path / "fresh.onnx", tmp_path / "existing.onnx"
    existing.write_bytes(good.read_bytes())
    for out in (fresh, existing):
        code = export_onnx.main(["--checkpoint", str(nan), "--out", str(out)])
        captured = capsys.readouterr()
        one_line_error(code, captured.err, str(nan), "weight tensors are NaN or infinite")
        assert captured.out == ""
    assert not fresh.exists() and existing.read_bytes() == good.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.onnx", "nan.pt"]


def test_an_opset_the_exporter_cannot_honour_is_refused_and_nothing_written(
    exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, good = exported
    out = tmp_path / "model.onnx"
    for opset in (6, 99):  # outside what torch.onnx / onnx know: refused before the model is read
        code = export_onnx.main(["--checkpoint", str(ckpt), "--out", str(out), "--opset", str(opset)])
        one_line_error(code, capsys.readouterr().err, f"--opset {opset}", "the exporter writes opsets 7 to")
        assert not out.exists()
    # In range, but the exporter cannot convert this network to it and falls back to its own opset.
    out.write_bytes(good.read_bytes())
    code = export_onnx.main(["--checkpoint", str(ckpt), "--out", str(out), "--opset", "13"])
    captured = capsys.readouterr()
    one_line_error(code, captured.err, "--opset 13", "cannot be exported at that opset", "not written")
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 2  # + "exporting"
    assert out.read_bytes() == good.read_bytes() and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


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
