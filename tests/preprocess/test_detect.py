"""preprocess/detect.py: the MTCNN cascade, its helpers, and its agreement with real LFW landmarks."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.cli import UserError
from preprocess import convert_lnet, detect
from preprocess.detect import Face, detect_faces, landmark_error, nms, pyramid_scales
from preprocess.face_choice import pick_face
from tests._long import long_real_lfw
from tests._real_lfw import LFW, REFERENCE

LANDMARKS = LFW / "lfw_landmark_150.txt"
needs_lfw = pytest.mark.skipif(
    not LANDMARKS.is_file() or not (LFW / "lfw").is_dir(),
    reason=f"real LFW (lfw/ and lfw_landmark_150.txt) not found in {LFW}",
)
SUBSET = 300  # images of the fixed random subset the CI test runs on (seed 0)


def _reference_rows() -> list[tuple[str, np.ndarray]]:
    rows = []
    for line in LANDMARKS.read_text().splitlines():
        name, _, values = line.partition("\t")
        if (LFW / "lfw" / name).is_file():
            rows.append((name, np.array(values.split(), dtype=np.float64).reshape(5, 2)))
    return rows


def _rgb(name: str) -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(LFW / "lfw" / name))[:, :, ::-1])


# ------------------------------------------------------------------------------ helpers, no data


def test_nms_keeps_the_best_of_overlapping_boxes_and_separate_ones() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [2, 2, 6, 6]], dtype=float)
    scores = np.array([0.8, 0.9, 0.7, 0.95])
    # Union overlap: box 1 beats box 0 (IoU 0.68); the small box 3 overlaps box 1 by only 16/100.
    assert nms(boxes, scores, 0.5).tolist() == [3, 1, 2]
    # Min overlap: box 3 lies wholly inside box 1, so box 1 goes when 3 is kept first.
    assert nms(boxes, scores, 0.5, mode="min").tolist() == [3, 2]


def test_pyramid_covers_min_size_to_the_whole_image() -> None:
    scales = pyramid_scales(150, 200, min_size=20)
    assert scales[0] == pytest.approx(12 / 20)
    assert np.allclose(np.diff(np.log(scales)), np.log(0.709))
    assert 150 * scales[-1] >= 12 > 150 * scales[-1] * 0.709  # the last level still fits one window
    assert pyramid_scales(10, 10, min_size=20) == []
    with pytest.raises(ValueError, match="min_size"):
        pyramid_scales(100, 100, min_size=0)


def test_blank_image_has_no_face_and_bad_arrays_are_refused() -> None:
    assert detect_faces(np.full((120, 160, 3), 128, dtype=np.uint8)) == []
    with pytest.raises(ValueError, match="uint8"):
        detect_faces(np.zeros((50, 50, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        detect_faces(np.zeros((50, 50, 2), dtype=np.uint8))


def test_missing_weights_package_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "facenet_pytorch" else real(name, *a)
    )
    with pytest.raises(UserError, match=r"pip install --no-deps facenet-pytorch==2\.6\.0") as err:
        detect.weights_dir()
    assert "\n" not in str(err.value)


def test_missing_lnet_weights_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"lnet\.pt: face detector weights missing; it ships with") as err:
        detect.Detector(lnet_weights=tmp_path / "lnet.pt")
    assert "\n" not in str(err.value)


class _ConstantLNet(torch.nn.Module):
    """An L-Net answering the same (x, y) for every patch, direct or mirrored."""

    def __init__(self, x: float, y: float) -> None:
        super().__init__()
        self.answer = torch.tensor([x, y])

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.answer.expand(len(patches), 5, 2)


def test_lnet_stage_measures_from_the_patch_corner_averages_the_mirror_and_drops_large_moves() -> None:
    detector = detect.Detector()
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    points = np.array([[40.3, 40.6], [60.2, 40.1], [50.5, 50.9], [42.0, 62.2], [58.7, 61.5]])
    face = Face(box=(20.0, 20.0, 61.0, 58.0), score=0.9, landmarks=points)  # patch P: 15 -> 16
    corner = np.floor(points - 8)
    detector.lnet = _ConstantLNet(0.3, 0.6)
    [moved] = detector._locate_points(image, [face])
    # x: 0.3 direct, 1 - 0.3 from the mirror, mean 0.5 of the patch; y: 0.6 of it, from its corner.
    assert np.allclose(moved.landmarks, corner + [0.5 * 16, 0.6 * 16])
    detector.lnet = _ConstantLNet(0.5, 0.9)  # 0.4 of the patch from its centre: too far, kept
    [kept] = detector._locate_points(image, [face])
    assert np.array_equal(kept.landmarks, points)


def _varint(value: int) -> bytes:
    out = b""
    while value >= 0x80:
        out, value = out + bytes([value & 0x7F | 0x80]), value >> 7
    return out + bytes([value])


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protocol-buffer field (all that a caffemodel's layers need here)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _caffemodel(layers: dict[str, list[np.ndarray]]) -> bytes:
    """NetParameter.layer (100) -> name (1), blobs (7) -> shape (7: packed dims, 1), data (5: packed)."""

    def blob(array: np.ndarray) -> bytes:
        dims = b"".join(_varint(d) for d in array.shape)
        return _field(7, _field(1, dims)) + _field(5, array.astype("<f4").tobytes())

    return b"".join(
        _field(100, _field(1, name.encode()) + b"".join(_field(7, blob(b)) for b in blobs))
        for name, blobs in layers.items()
    )


def _caffe_lnet(layers: dict[str, list[np.ndarray]], patches: torch.Tensor) -> torch.Tensor:
    """det4 as Caffe ran it from MATLAB: on transposed patches (N, 15, x, y), flattening (c, x, y)."""
    f = torch.nn.functional
    t = {k: [torch.from_numpy(b) for b in v] for k, v in layers.items()}
    x = patches.transpose(-1, -2).reshape(len(patches), 15, 24, 24)
    feats = []
    for k in range(1, 6):
        y = x[:, 3 * (k - 1) : 3 * k]
        for stage in (1, 2):
            y = f.prelu(f.conv2d(y, *t[f"conv{stage}_{k}"]), t[f"prelu{stage}_{k}"][0])
            y = f.max_pool2d(y, 3, 2, ceil_mode=True)
        feats.append(f.prelu(f.conv2d(y, *t[f"conv3_{k}"]), t[f"prelu3_{k}"][0]))
    z = f.prelu(f.linear(torch.cat(feats, 1).flatten(1), *t["fc4"]), t["prelu4"][0])
    return torch.stack(
        [
            f.linear(f.prelu(f.linear(z, *t[f"fc4_{k}"]), t[f"prelu4_{k}"][0]), *t[f"fc5_{k}"])
            for k in range(1, 6)
        ],
        dim=1,
    )


def test_lnet_conversion_computes_what_caffe_computed(tmp_path: Path) -> None:
    """A det4-shaped caffemodel of random weights, converted by the command: our _LNet on a patch
    gives what Caffe's layout gives on the transposed patch (the kernels and dense columns moved)."""
    rng = np.random.default_rng(0)
    shapes = {}
    for k in range(1, 6):
        shapes |= {
            f"conv1_{k}": [(28, 3, 3, 3), (28,)],
            f"prelu1_{k}": [(28,)],
            f"conv2_{k}": [(48, 28, 3, 3), (48,)],
            f"prelu2_{k}": [(48,)],
            f"conv3_{k}": [(64, 48, 2, 2), (64,)],
            f"prelu3_{k}": [(64,)],
            f"fc4_{k}": [(64, 256), (64,)],
            f"prelu4_{k}": [(64,)],
            f"fc5_{k}": [(2, 64), (2,)],
        }
    shapes |= {"fc4": [(256, 2880), (256,)], "prelu4": [(256,)]}
    layers = {
        name: [rng.normal(0, 0.1, s).astype(np.float32) for s in blob_shapes]
        for name, blob_shapes in shapes.items()
    }
    source, out = tmp_path / "det4.caffemodel", tmp_path / "lnet.pt"
    source.write_bytes(_caffemodel(layers))
    assert convert_lnet.main(["--caffemodel", str(source), "--out", str(out)]) == 0
    net = detect._LNet()
    net.load_state_dict(torch.load(out, weights_only=True))
    patches = torch.from_numpy(rng.normal(0, 1, (3, 5, 3, 24, 24)).astype(np.float32))
    with torch.inference_mode():
        assert torch.allclose(net.eval()(patches), _caffe_lnet(layers, patches), rtol=1e-4, atol=1e-3)
    with pytest.raises(UserError, match="layer fc4 missing"):
        convert_lnet.convert({k: v for k, v in layers.items() if k != "fc4"})


def test_landmark_error_is_relative_to_the_inter_ocular_distance() -> None:
    ref = np.array([[0, 0], [20, 0], [10, 10], [2, 20], [18, 20]], dtype=float)
    assert landmark_error(ref, ref) == 0
    assert landmark_error(ref + [1.0, 0.0], ref) == pytest.approx(1 / 20)


# ---------------------------------------------------------------------------------- real LFW


@needs_lfw
def test_mirrored_photo_gives_mirrored_points_in_template_order() -> None:
    """Left/right are as the image shows them: flipping the photo swaps eyes and mouth corners."""
    name = "Aaron_Eckhart/Aaron_Eckhart_0001.jpg"
    image = _rgb(name)
    face = pick_face(detect_faces(image), image.shape)
    mirrored = pick_face(detect_faces(np.ascontiguousarray(image[:, ::-1])), image.shape)
    assert face is not None and mirrored is not None
    pts = face.landmarks
    assert pts[0, 0] < pts[2, 0] < pts[1, 0] and pts[3, 0] < pts[4, 0]  # eyes and mouth left to right
    assert max(pts[0, 1], pts[1, 1]) < pts[2, 1] < min(pts[3, 1], pts[4, 1])  # eyes, nose, mouth down
    back = mirrored.landmarks[[1, 0, 2, 4, 3]] * [-1, 1] + [image.shape[1] - 1, 0]
    assert landmark_error(back, pts) < 0.03


@needs_lfw
def test_finds_lfw_faces_and_agrees_with_their_landmarks_on_a_fixed_subset() -> None:
    """300 images drawn with seed 0 (~10 s on a free core). The full set: bench/detector.py."""
    rows = random.Random(0).sample(_reference_rows(), SUBSET)
    errors, missed = [], 0
    for name, reference in rows:
        image = _rgb(name)
        face = pick_face(detect_faces(image), image.shape)
        if face is None:
            missed += 1
            continue
        errors.append(landmark_error(face.landmarks, reference))
        assert 0 < face.score <= 1 and face.box[2] > 0 and face.box[3] > 0
    err = np.array(errors)
    assert missed <= 0.01 * SUBSET, missed
    # Measured on this subset: within 5% for 0.980, median 0.018, p95 0.032 (all of LFW:
    # bench/detector.py); before the L-Net stage 0.873, 0.033, 0.062.
    assert (err <= 0.05).mean() >= 0.95, np.percentile(err, [50, 95])
    assert np.median(err) <= 0.025 and np.percentile(err, 95) <= 0.045, np.percentile(err, [50, 95])


@pytest.mark.slow
@needs_lfw
@pytest.mark.skipif(not REFERENCE.is_file(), reason=f"the reference MobileFaceNet is not at {REFERENCE}")
@long_real_lfw
def test_reference_model_on_detector_aligned_lfw(tmp_path: Path) -> None:
    """The reference MobileFaceNet on LFW shards built with `build_shards.py lfw --detect` (the
    detector's points, not the landmark file's). Slow: detection of all 13,232 photos (~5 min on 2
    free cores), a 112x96 build, and 13,232 MobileFaceNet forwards."""
    from eval.import_mobilefacenet import main as import_main
    from eval.lfw import main as lfw_main
    from preprocess.build_shards import main as build_main

    shards = tmp_path / "lfw-detected"
    argv = ["lfw", "--root", str(LFW), "--out", str(shards), "--image-size", "112x96", "--detect"]
    assert build_main(argv) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["num_rejects"] <= 0.01 * manifest["num_inputs"]
    ckpt = tmp_path / "reference.pt"
    assert import_main(["--source", str(REFERENCE), "--out", str(ckpt), "--image-size", "112x96"]) == 0
    out = tmp_path / "metrics.json"
    assert (
        lfw_main(
            ["--checkpoint", str(ckpt), "--shards", str(shards), "--json", str(out), "--quiet", "--no-flip"]
        )
        == 0
    )
    metrics = json.loads(out.read_text())
    print(json.dumps({k: metrics[k] for k in ("accuracy_mean", "accuracy_std", "auc", "threshold")}))
    assert metrics["num_pairs"] == 6000
    assert metrics["accuracy_mean"] >= 0.985, metrics  # measured 0.9880 +- 0.0041 (with the L-Net stage)
