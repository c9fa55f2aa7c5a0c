"""models/load.py on ONNX files another tool wrote: metadata that is absent, in another form or of
another meaning, and graphs whose input or output is not an embedding model's. Each file is a tiny
torch.onnx.export with its metadata then edited by the onnx package."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from common.cli import UserError
from eval.identification.faces import load_face_model
from models.load import load_model, openvino_installed


class Tiny(torch.nn.Module):
    """An 8-d 'embedding' of the mean colour; `cast`: takes float16 input; `spatial`: (N, 8, 1, 1)."""

    def __init__(self, cast: bool = False, spatial: bool = False) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 8)
        self.cast, self.spatial = cast, spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.float().mean(dim=(2, 3)))
        return y[:, :, None, None] if self.spatial else y


def _export(path: Path, model: Tiny, dynamic_hw: bool = False) -> Path:
    axes = {0: "n", 2: "h", 3: "w"} if dynamic_hw else {0: "n"}
    dtype = torch.float16 if model.cast else torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 112, 112, dtype=dtype),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["embedding"],
            dynamic_axes={"input": axes},
        )
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    return {
        "fixed": _export(tmp / "fixed.onnx", Tiny()),
        "dynamic": _export(tmp / "dynamic.onnx", Tiny(), dynamic_hw=True),
        "float16": _export(tmp / "float16.onnx", Tiny(cast=True)),
        "spatial": _export(tmp / "spatial.onnx", Tiny(spatial=True)),
    }


def _with_metadata(source: Path, out: Path, **meta: str) -> Path:
    import onnx

    proto = onnx.load(str(source))
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    return out


RUNTIMES = [
    "onnxruntime",
    pytest.param(
        "openvino",
        marks=pytest.mark.skipif(
            not openvino_installed(), reason="openvino is not installed (requirements/cpu.txt)"
        ),
    ),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_no_metadata_takes_the_graphs_sizes(exported, runtime, capsys) -> None:
    model = load_model(exported["fixed"], runtime=runtime)
    assert (model.image_size, model.embedding_size, model.backbone, model.threshold) == (
        (112, 112),
        8,
        "onnx",
        None,
    )
    assert capsys.readouterr().err == ""
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    assert model.embed(x).shape == (2, 8)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_metadata_in_another_form_is_read_or_replaced_with_a_warning(
    exported, tmp_path, runtime, capsys
) -> None:
    other = {
        "image_size": "112x112",
        "embedding_size": " 8",
        "threshold": "0.31",
        "mean": "[127.5, 127.5, 127.5]",
    }
    model = load_model(
        _with_metadata(exported["fixed"], tmp_path / "a.onnx", **other, std="127.5"), runtime=runtime
    )
    assert (model.image_size, model.embedding_size, model.threshold) == ((112, 112), 8, 0.31)
    assert capsys.readouterr().err == ""
    path = _with_metadata(
        exported["fixed"], tmp_path / "b.onnx", image_size="112 by 112", embedding_size="8d", threshold="1.7"
    )
    model = load_model(path, runtime=runtime)
    assert (model.image_size, model.embedding_size, model.threshold) == ((112, 112), 8, None)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"warning: {path}: metadata image_size '112 by 112' is not in facetrain's form; "
        "the input shape's image_size is used",
        f"warning: {path}: metadata embedding_size '8d' is not in facetrain's form; "
        "the output's embedding_size is used",
        f"warning: {path}: metadata threshold '1.7' is not in facetrain's form; no threshold is used",
    ]


def test_a_size_nothing_fixes_is_one_line_or_the_given_size(exported, tmp_path, capsys) -> None:
    path = _with_metadata(exported["dynamic"], tmp_path / "d.onnx", image_size="112 by 112")
    with pytest.raises(
        UserError, match=r"d.onnx: metadata image_size '112 by 112' is not 'H,W' and the model's input"
    ):
        load_model(path, runtime="onnxruntime")
    assert load_model(path, runtime="onnxruntime", image_size=(112, 96)).image_size == (112, 96)
    assert "the given image_size is used" in capsys.readouterr().err
    bare = _with_metadata(exported["dynamic"], tmp_path / "bare.onnx")
    with pytest.raises(UserError, match=r"bare.onnx: the model records no input size"):
        load_model(bare, runtime="onnxruntime")


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"image_size": "96,96"}, r"model input is 112x112, its metadata says 96x96"),
        ({"embedding_size": "512"}, r"metadata embedding_size 512, the model outputs 8 numbers"),
        ({"color": "BGR"}, r"metadata color 'BGR': the commands feed RGB faces"),
        ({"layout": "NHWC"}, r"metadata layout 'NHWC': the commands feed NCHW faces"),
        (
            {"mean": "0.485,0.456,0.406"},
            r"metadata mean '0.485,0.456,0.406': the commands feed \(pixel / 255",
        ),
        ({"std": "1"}, r"metadata std '1': the commands feed"),
    ],
)
def test_metadata_that_contradicts_the_model_or_its_input_is_one_line(
    exported, tmp_path, meta, message
) -> None:
    path = _with_metadata(exported["fixed"], tmp_path / "m.onnx", **meta)
    with pytest.raises(UserError, match=rf"m.onnx: {message}"):
        load_model(path, runtime="onnxruntime")


def test_a_graph_that_is_not_an_embedding_model_is_one_line(exported) -> None:
    with pytest.raises(
        UserError, match=r"float16.onnx: input input is tensor\(float16\), the commands feed tensor\(float\)"
    ):
        load_model(exported["float16"], runtime="onnxruntime")
    with pytest.raises(
        UserError, match=r"spatial.onnx: expected an \(N, D\) embedding output, the model's is"
    ):
        load_model(exported["spatial"], runtime="onnxruntime")


def test_identify_loads_a_foreign_onnx(exported, tmp_path) -> None:
    """eval/identify.py's loader (a '112x112' image_size was a traceback there)."""
    path = _with_metadata(exported["fixed"], tmp_path / "f.onnx", image_size="112x112", backbone="w600k")
    model = load_face_model(path, runtime="onnxruntime")
    assert model.info.image_size == (112, 112) and model.info.architecture == "w600k/8"
