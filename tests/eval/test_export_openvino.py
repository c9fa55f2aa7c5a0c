"""eval/export_openvino.py and the OpenVINO kind of models/load.py: fp32 and INT8 IRs, every model
file kind giving eval/lfw.py the same figures, the --max-drop refusal, metadata, bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch

from eval import export_onnx, export_openvino
from eval.identification.faces import load_face_model
from eval.lfw import main as lfw_main
from eval.verify import main as verify_main
from models.load import OPENVINO_CHUNK, RT_INFO_KEY, load_model
from models.model_file import atomic_save, load_checkpoint
from tests._eval_util import build_lfw_shards, make_checkpoint, one_line_error

ROOT = Path(__file__).resolve().parents[2]
METRICS = ("accuracy_mean", "accuracy_std", "same_accuracy", "diff_accuracy", "tar_at_far_1e-3")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny checkpoint that stored a threshold, its ONNX file, its fp32 and INT8 IRs, LFW shards."""
    d = tmp_path_factory.mktemp("openvino")
    ckpt = make_checkpoint(d / "tiny.pt", seed=3)
    atomic_save({**load_checkpoint(ckpt), "metrics": {"threshold": 0.42}}, ckpt)
    shards = build_lfw_shards(d / "lfw", seed=1)
    assert export_onnx.main(["--model", str(ckpt), "--out", str(d / "tiny.onnx")]) == 0
    assert export_openvino.main(["--model", str(ckpt), "--out", str(d / "fp32.xml")]) == 0
    assert (
        export_openvino.main(
            [
                "--model",
                str(d / "tiny.onnx"),
                "--out",
                str(d / "int8.xml"),
                "--int8",
                "--calibration",
                str(shards),
                "--samples",
                "24",
                "--check-sets",
                f"lfw={shards}",
                "--max-drop",
                "100",
            ]
        )
        == 0
    )
    return {
        "ckpt": ckpt,
        "onnx": d / "tiny.onnx",
        "fp32": d / "fp32.xml",
        "int8": d / "int8.xml",
        "shards": shards,
    }


def lfw_figures(model: Path, shards: Path, out: Path, *extra: str) -> dict:
    assert (
        lfw_main(["--model", str(model), "--shards", str(shards), "--json", str(out), "--quiet", *extra]) == 0
    )
    return json.loads(out.read_text())


def test_every_model_kind_gives_the_checkpoint_figures(files: dict[str, Path], tmp_path: Path) -> None:
    reference = lfw_figures(files["ckpt"], files["shards"], tmp_path / "ckpt.json")
    for name, model, extra in (
        ("onnxruntime", files["onnx"], ("--runtime", "onnxruntime")),
        ("onnx-openvino", files["onnx"], ("--runtime", "openvino")),
        ("onnx-auto", files["onnx"], ()),
        ("fp32", files["fp32"], ()),
    ):
        got = lfw_figures(model, files["shards"], tmp_path / f"{name}.json", *extra)
        for key in METRICS:
            assert got[key] == reference[key], (name, key)
        assert got["auc"] == pytest.approx(reference["auc"], abs=1e-6), name
        assert got["threshold"] == pytest.approx(reference["threshold"], abs=1e-4), name
    int8 = lfw_figures(files["int8"], files["shards"], tmp_path / "int8.json")
    assert abs(int8["auc"] - reference["auc"]) < 0.05  # 60 pairs: a coarse check; the drop is measured


def test_verify_runs_onnx_under_openvino_from_several_threads(files: dict[str, Path], tmp_path: Path) -> None:
    """eval/verify.py runs an ONNX or OpenVINO model's batches from several threads at once (--parallel)."""
    figures = []
    for name, model, runtime in (
        ("ort", "onnx", "onnxruntime"),
        ("ov", "onnx", "openvino"),
        ("ir", "fp32", "auto"),
    ):
        out = tmp_path / f"{name}.json"
        assert (
            verify_main(
                [
                    "--model",
                    str(files[model]),
                    "--runtime",
                    runtime,
                    "--sets",
                    f"lfw={files['shards']}",
                    "--parallel",
                    "3",
                    "--batch-size",
                    "4",
                    "--json",
                    str(out),
                    "--quiet",
                ]
            )
            == 0
        )
        figures.append(json.loads(out.read_text())["sets"]["lfw"])
    for got in figures[1:]:
        assert got["accuracy_mean"] == figures[0]["accuracy_mean"]
        assert got["auc"] == pytest.approx(figures[0]["auc"], abs=1e-6)


def test_embeddings_of_each_runtime(files: dict[str, Path]) -> None:
    x = export_openvino.model_input(export_openvino.aligned_faces(files["shards"], 12))
    torch_emb = load_model(files["ckpt"]).embed(x)
    assert np.abs(torch_emb).max() > 0.1  # a meaningful scale for the tolerance
    for path, runtime in (
        (files["onnx"], "onnxruntime"),
        (files["onnx"], "openvino"),
        (files["fp32"], "auto"),
    ):
        model = load_model(path, runtime=runtime)
        assert model.runtime == ("onnxruntime" if runtime == "onnxruntime" else "openvino")
        np.testing.assert_allclose(model.embed(x), torch_emb, atol=1e-4)
    int8 = load_model(files["int8"]).embed(x)
    assert export_openvino.min_cosine(int8, torch_emb) > 0.95


def test_large_batches_run_in_chunks_in_order(files: dict[str, Path]) -> None:
    """With every core, a batch larger than OPENVINO_CHUNK runs as chunks on per-core streams (the
    last one short), a smaller one as one inference: the rows are each image's own either way, as
    with a thread count given (one inference per call, here from two threads at once)."""
    x = export_openvino.model_input(export_openvino.aligned_faces(files["shards"], 2 * OPENVINO_CHUNK + 5))
    expected = load_model(files["onnx"], runtime="onnxruntime").embed(x)
    for kind in ("fp32", "int8"):
        model = load_model(files[kind])
        one_by_one = np.concatenate([model.embed(x[i : i + 1]) for i in range(len(x))])
        np.testing.assert_allclose(model.embed(x), one_by_one, atol=1e-5)
        if kind == "fp32":
            np.testing.assert_allclose(one_by_one, expected, atol=1e-4)
        per_thread = load_model(files[kind], onnx_threads=1)
        with ThreadPoolExecutor(2) as pool:
            halves = list(pool.map(per_thread.embed, [x, x.flip(0)]))
        np.testing.assert_allclose(halves[0], one_by_one, atol=1e-5)
        np.testing.assert_allclose(halves[1], one_by_one[::-1], atol=1e-5)


def test_auto_runs_onnx_under_openvino_on_the_cpu(files: dict[str, Path]) -> None:
    assert load_model(files["onnx"]).runtime == "openvino"
    assert load_model(files["onnx"], runtime="onnxruntime").runtime == "onnxruntime"


def test_metadata_round_trip(files: dict[str, Path]) -> None:
    for kind in ("fp32", "int8"):
        model = load_model(files[kind])
        assert (model.kind, model.image_size, model.embedding_size) == ("openvino", (112, 112), 32)
        assert model.backbone == "tiny"
        meta = ov.Core().read_model(str(files[kind])).get_rt_info([RT_INFO_KEY]).astype(dict)
        assert meta["precision"].astype(str) == kind
        assert meta["normalization"].astype(str) == "(pixel / 255 - 0.5) / 0.5"
        assert meta["color"].astype(str) == "RGB"
    assert load_model(files["fp32"]).threshold == pytest.approx(0.42)


def test_int8_is_smaller_and_quantized(files: dict[str, Path]) -> None:
    ops = {op.get_type_name() for op in ov.Core().read_model(str(files["int8"])).get_ops()}
    assert "FakeQuantize" in ops
    assert files["int8"].with_suffix(".bin").stat().st_size < files["fp32"].with_suffix(".bin").stat().st_size


@pytest.mark.skipif(
    "INT8" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
    reason="this CPU has no INT8 kernels",
)
def test_int8_runs_every_convolution_in_int8(files: dict[str, Path]) -> None:
    """The CPU plugin runs each convolution, the depthwise ones included, on 8-bit input: an IR read
    with Core.read_model kept the depthwise ones in float32 with a Reorder after each."""
    compiled = ov.Core().compile_model(str(files["int8"]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    precisions = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":  # depthwise ones too, in the runtime model
            precisions[op.get_friendly_name()] = info["runtimePrecision"].astype(str)
    assert len(precisions) == 12  # tiny: the stem, 5 depthwise, 5 pointwise and the GDC
    assert {name: p for name, p in precisions.items() if p not in ("u8", "i8")} == {}


def test_max_drop_refusal_leaves_the_old_file_and_no_temporary(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.xml"
    for suffix in (".xml", ".bin"):  # a good model already there
        out.with_suffix(suffix).write_bytes(files["fp32"].with_suffix(suffix).read_bytes())
    argv = [
        "--model",
        str(files["onnx"]),
        "--out",
        str(out),
        "--int8",
        "--calibration",
        str(files["shards"]),
        "--samples",
        "8",
        "--check-sets",
        f"lfw={files['shards']}",
    ]
    # Every export "drops" more than -100 points: the refusal path, whatever the quantized accuracy.
    code = export_openvino.main([*argv, "--max-drop", "-100"])
    err = capsys.readouterr()
    one_line_error(code, err.err, str(out), "not written", "--max-drop")
    assert json.loads(err.out.strip().splitlines()[-1])["written"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]
    assert out.with_suffix(".bin").read_bytes() == files["fp32"].with_suffix(".bin").read_bytes()
    assert export_openvino.main([*argv, "--max-drop", "-100", "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]
    assert load_model(out).embed(torch.zeros(1, 3, 112, 112)).shape == (1, 32)
    assert out.with_suffix(".bin").read_bytes() != files["fp32"].with_suffix(".bin").read_bytes()


def test_bad_openvino_files_are_one_line(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<?xml version='1.0'?><net>half a model")
    bad.with_suffix(".bin").write_bytes(b"\0" * 16)
    shards = str(files["shards"])
    one_line_error(
        lfw_main(["--model", str(bad), "--shards", shards]),
        capsys.readouterr().err,
        str(bad),
        "not a loadable OpenVINO model",
    )
    bad.with_suffix(".bin").unlink()
    one_line_error(
        lfw_main(["--model", str(bad), "--shards", shards]),
        capsys.readouterr().err,
        str(bad),
        "bad.bin is missing",
    )
    one_line_error(
        lfw_main(["--model", str(files["fp32"]), "--shards", shards, "--runtime", "onnxruntime"]),
        capsys.readouterr().err,
        "OpenVINO only",
    )
    one_line_error(
        export_openvino.main(["--model", str(files["fp32"]), "--out", str(tmp_path / "x.xml")]),
        capsys.readouterr().err,
        "already an OpenVINO model",
    )
    one_line_error(
        export_openvino.main(["--model", str(files["onnx"]), "--out", str(tmp_path / "x.xml"), "--int8"]),
        capsys.readouterr().err,
        "--calibration",
    )


def test_identify_loads_an_ir_with_its_fingerprint(files: dict[str, Path]) -> None:
    """eval/identify.py's model: the IR's architecture, size and a fingerprint of its .xml and .bin."""
    fp32, again, int8 = (load_face_model(files[k]) for k in ("fp32", "fp32", "int8"))
    assert (fp32.info.architecture, fp32.info.image_size) == ("tiny/32", (112, 112))
    assert fp32.info.fingerprint == again.info.fingerprint != int8.info.fingerprint
    assert fp32.threshold == pytest.approx(0.42)


_SIGNAL_STACK_CHECK = """
import ctypes, faulthandler, sys
import torch
from models.load import load_model

class StackT(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]

def stack():
    now = StackT()
    ctypes.CDLL(None).sigaltstack(None, ctypes.byref(now))
    return (now.sp or 0, now.flags, now.size)

faulthandler.enable()  # as pytest does: the thread has a signal stack of Python's
before = stack()
models = []
for path in sys.argv[1:]:
    models.append(load_model(path, runtime="openvino"))
    models[-1].embed(torch.zeros(1, 3, 112, 112))
    assert stack() == before, ("loaded", path, before, stack())
while models:  # the first loaded goes first: OpenVINO then put back the second's stack, freed next
    del models[0]
    assert stack() == before, ("released", before, stack())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack checked on Linux only")
def test_loading_an_openvino_model_keeps_the_threads_signal_stack(files: dict[str, Path]) -> None:
    """OpenVINO's compile_model repoints the calling thread's alternate signal stack at memory it later
    frees; a signal delivered there (SIGCHLD, once torch's DataLoader set a handler) killed a test run
    with SIGSEGV. models/load.py gives the thread its own stack back. In a fresh process: OpenVINO
    does it on its first compile in a process, and puts back a stale stack when models go out of order."""
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNAL_STACK_CHECK, str(files["fp32"]), str(files["onnx"])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
