"""Knowledge distillation (`distill.*`, trainer/distill.py): the loss against its formula, a teacher
that stays frozen and gets no gradient, an ONNX teacher, the resume rule, one-line mistakes, and a
tiny student that agrees with a trained teacher after distillation but not when trained alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common.cli import UserError
from eval.verification.metrics import best_threshold
from models.load import load_model
from models.model_file import INPUT_SPEC, load_checkpoint, load_embedding_model
from tests._trainer_util import metrics, teacher_file, tiny_overrides
from trainer import distributed as dist_util
from trainer.config import load_config
from trainer.distill import distill_loss
from trainer.engine import Trainer, train
from trainer.main import main
from trainer.synthetic import SyntheticLoader

# 32 identities at 32x32 (tiny_overrides: 32-d embeddings), quiet
DATA = {
    "data.synthetic.classes": 32,
    "data.synthetic.per_class": 8,
    "loader.batch_size": 32,
    "logging.every_steps": 10,
    "checkpoint.every_steps": 1000,
    "logging.display": "none",
    "logging.tensorboard": "off",
}


def onnx_file(path: Path, normalization: str = INPUT_SPEC["normalization"]) -> Path:
    """A small ONNX embedder (global average pool, then a 3 x 32 matrix) for 32x32 faces whose
    metadata states this normalization."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32), "w"
    )
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["embeddings"]),
        ],
        "embedder",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 32])],
        [weight],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    helper.set_model_props(proto, {**INPUT_SPEC, "normalization": normalization})
    onnx.save(proto, str(path))
    return path


def test_the_loss_is_the_hand_formula():
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
    unit = lambda v: v / np.sqrt((v**2).sum())  # noqa: E731
    cosine = np.mean([1 - unit(a) @ unit(b) for a, b in zip(s, t)])
    l2 = np.mean([((unit(a) - unit(b)) ** 2).sum() for a, b in zip(s, t)])
    got = {kind: float(distill_loss(torch.tensor(s), torch.tensor(t), kind)) for kind in ("cosine", "l2")}
    assert got["cosine"] == pytest.approx(cosine, rel=1e-6)
    assert got["l2"] == pytest.approx(l2, rel=1e-6) and l2 == pytest.approx(2 * cosine)
    # the student's scale does not count, only its direction
    assert float(distill_loss(torch.tensor(3 * s), torch.tensor(t), "cosine")) == pytest.approx(cosine)


def test_the_teacher_stays_frozen_gets_no_gradient_and_the_checkpoint_names_it(tmp_path):
    teacher_path = teacher_file(tmp_path / "teacher.pt")
    cfg = load_config(None, tiny_overrides(tmp_path / "run", steps=4, **{"distill.teacher": teacher_path}))
    trainer = Trainer(cfg, dist_util.setup("cpu"))
    teacher = trainer.parts.teacher.module
    before = {k: v.clone() for k, v in teacher.state_dict().items()}  # BN running statistics too
    student_before = {k: v.clone() for k, v in trainer.parts.backbone.state_dict().items()}
    summary = trainer.fit()
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(student_before[k], v) for k, v in trainer.parts.backbone.state_dict().items())
    rows = metrics(tmp_path / "run")
    assert (
        all(0 < r["distill_loss"] < 2 for r in rows) and summary["distill_loss"] == rows[-1]["distill_loss"]
    )
    recorded = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["teacher"]
    assert recorded == {"path": str(teacher_path), "sha256": load_model(teacher_path).fingerprint()}


def test_weight_0_logs_the_term_and_trains_as_without_a_teacher(tmp_path):
    runs = {}
    for name, extra in (("alone", {}), ("w0", {"distill.teacher": onnx_file(tmp_path / "t.onnx")})):
        train(load_config(None, tiny_overrides(tmp_path / name, steps=3, **extra, **{"distill.weight": 0})))
        runs[name] = metrics(tmp_path / name)
    # an ONNX teacher runs in the loader's runtime, on the CPU here
    assert [r["loss"] for r in runs["alone"]] == pytest.approx([r["loss"] for r in runs["w0"]], rel=1e-5)
    assert "distill_loss" not in runs["alone"][-1] and 0 < runs["w0"][-1]["distill_loss"] < 2


def test_a_resume_with_another_teacher_is_refused_in_one_line(tmp_path):
    first = teacher_file(tmp_path / "a.pt")
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(run, steps=4, **{"distill.teacher": first})))
    for teacher, said in ((teacher_file(tmp_path / "b.pt", seed=1), "b.pt (sha256 "), ("null", "no teacher")):
        with pytest.raises(UserError) as err:
            train(load_config(None, tiny_overrides(run, steps=6, **{"distill.teacher": teacher})))
        text = str(err.value)
        assert "cannot resume: it was trained with" in text and said in text and "\n" not in text, text
    moved = shutil.copy(first, tmp_path / "moved.pt")  # the same weights elsewhere: the same teacher
    assert train(load_config(None, tiny_overrides(run, steps=6, **{"distill.teacher": moved})))["step"] == 6


def test_teacher_mistakes_are_one_line(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    cases = [
        (tmp_path / "absent.pt", "'distill.teacher'"),
        (garbage, "distill.teacher: " + f"{garbage}: not a readable checkpoint"),
        (
            teacher_file(tmp_path / "wide.pt", embedding_size=64),
            "64 dimensions, this run's model.embedding_size is 32",
        ),
        (
            teacher_file(tmp_path / "big.pt", size=48),
            "model takes (48, 48) faces, the training data hold (32, 32)",
        ),
        (
            onnx_file(tmp_path / "other.onnx", "(pixel - 127.5) / 128"),
            "normalization '(pixel - 127.5) / 128'",
        ),
    ]
    for i, (teacher, fragment) in enumerate(cases):
        assert main(tiny_overrides(tmp_path / f"r{i}", steps=1, **{"distill.teacher": teacher})) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and fragment in err, err


def _unit_embeddings(path: Path, images: torch.Tensor) -> np.ndarray:
    model, _ = load_embedding_model(path)
    with torch.no_grad():
        return torch.nn.functional.normalize(model(images), dim=1).numpy()


def _verification_accuracy(emb: np.ndarray, labels: np.ndarray) -> float:
    """Best-threshold accuracy over every same-identity pair and as many other pairs (seeded)."""
    i, j = np.triu_indices(len(labels), 1)
    same = np.flatnonzero(labels[i] == labels[j])
    other = np.random.default_rng(0).choice(np.flatnonzero(labels[i] != labels[j]), len(same), replace=False)
    pick = np.concatenate([same, other])
    return best_threshold((emb[i[pick]] * emb[j[pick]]).sum(1), labels[i[pick]] == labels[j[pick]])[1]


def test_a_distilled_student_agrees_with_its_teacher_on_unseen_identities(tmp_path):
    """A width-32 tiny teacher (100 steps) and width-8 students (120 steps, same seed and data),
    judged on 32 identities none of them trained on. distill.weight=30: the CosFace term (s=30)
    pulls about s times harder than a unit-scale cosine term. Accuracy is printed, not asserted: at
    this scale distillation did not raise it (-6 to +1 points over 7 settings at weights 3-30)."""
    teacher = tmp_path / "teacher"
    train(load_config(None, tiny_overrides(teacher, steps=100, **DATA, **{"model.kwargs.width": 32})))
    teacher_pt = teacher / "checkpoints" / "last.pt"
    student = {**DATA, "model.kwargs.width": 8}
    train(load_config(None, tiny_overrides(tmp_path / "alone", steps=120, **student)))
    distilled = {**student, "distill.teacher": teacher_pt, "distill.weight": 30}
    train(load_config(None, tiny_overrides(tmp_path / "distilled", steps=120, **distilled)))

    unseen = SyntheticLoader(32, 6, (32, 32), batch_size=1, seed=12345)  # other seed: other identities
    labels = unseen.labels.numpy()
    t = _unit_embeddings(teacher_pt, unseen.images)
    agree, accuracy = {}, {"teacher": _verification_accuracy(t, labels)}
    for name in ("alone", "distilled"):
        e = _unit_embeddings(tmp_path / name / "checkpoints" / "last.pt", unseen.images)
        agree[name] = float((e * t).sum(1).mean())
        accuracy[name] = _verification_accuracy(e, labels)
    print(f"cosine with the teacher {agree}; verification accuracy {accuracy}")
    assert accuracy["teacher"] > 0.9  # a teacher worth agreeing with
    assert agree["distilled"] > agree["alone"] + 0.1, agree
