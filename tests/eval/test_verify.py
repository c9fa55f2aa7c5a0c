"""eval/verify.py: several sets in one table, any pairs file (View 2, View 1 + --folds, plain lists),
missing images, one-kind sets, only the used faces embedded, eval/lfw.py as its LFW preset, and
agreement with an imported .bin of the same faces."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.cli import UserError, run_cli
from eval import verify
from eval.import_bin import main as import_main
from eval.lfw import main as lfw_main
from eval.verification.pairsets import split_folds
from eval.verification.sets import evaluate_set, prepare_set
from eval.verification.shard_faces import read_jpeg, shard_jpegs
from models.backbones import build_backbone
from models.model_file import save_embedding_checkpoint
from shards.format import FORMAT_NAME, FORMAT_VERSION, sample_key, scaled_template
from shards.manifest import Pair, load_manifest, write_manifest
from shards.writer import ShardWriter
from tests._eval_util import METRIC_KEYS

SIZE = (112, 96)
NAMES = [f"Person_{c}" for c in "ABCDEFGHIJ"]  # 10 identities x 3 images


def _key(name: str, i: int) -> str:
    return sample_key(f"{name}/{name}_{i:04d}.jpg")


def make_shards(out: Path, size: tuple[int, int] = SIZE) -> Path:
    """30 faces (a coarse pattern per identity plus noise) in 2 shards; 40 pairs in 10 folds, plus
    one face (Person_J_0009) that no pair uses."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True)
    samples = []
    for label, name in enumerate(NAMES):
        coarse = np.random.default_rng(100 + label).integers(0, 256, (5, 5, 3)).astype(np.uint8)
        base = cv2.resize(coarse, size[::-1], interpolation=cv2.INTER_CUBIC).astype(float)
        for i in (1, 2, 3) + ((9,) if name == "Person_J" else ()):
            img = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
            jpg = cv2.imencode(".jpg", img)[1].tobytes()
            samples.append(
                (
                    _key(name, i),
                    jpg,
                    label,
                    {
                        "identity": name,
                        "label": label,
                        "source": f"{name}/{name}_{i:04d}.jpg",
                        "landmarks": [[0, 0]] * 5,
                    },
                )
            )
    infos = []
    for s, part in enumerate((samples[:16], samples[16:])):
        w = ShardWriter(out / f"lfw-{s:06d}.tar")
        for sample in part:
            w.add(*sample)
        infos.append(w.close())
    pairs = []
    for f in range(10):
        for k in range(2):
            n = NAMES[(f + k) % 10]
            pairs.append({"a": _key(n, 1), "b": _key(n, 2 + k), "same": True, "fold": f})
        for k in range(2):
            n1, n2 = NAMES[(f + k) % 10], NAMES[(f + k + 3) % 10]
            pairs.append({"a": _key(n1, 1 + k), "b": _key(n2, 3), "same": False, "fold": f})
    write_manifest(
        out,
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dataset": "lfw",
            "split": "test",
            "num_samples": len(samples),
            "num_classes": len(NAMES),
            "classes": NAMES,
            "image_size": list(size),
            "template": scaled_template(size),
            "jpeg_quality": 95,
            "num_rejects": 0,
            "num_inputs": len(samples),
            "pairs": pairs,
            "shards": [
                {"file": i.file, "index": i.index, "samples": i.samples, "bytes": i.bytes, "sha256": i.sha256}
                for i in infos
            ],
            "seed": 0,
            "command": "tests/eval/test_verify.py",
            "created_by": "tests",
        },
    )
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("verify") / "lfw")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.manual_seed(0)
    save_embedding_checkpoint(
        path,
        {"backbone": "tiny", "embedding_size": 32, "image_size": list(SIZE)},
        build_backbone("tiny", 32, SIZE).state_dict(),
    )
    return path


def _pack_from(shard_dir: Path, out: Path) -> Path:
    """An InsightFace-layout pack of the manifest's pairs, in order: (images, issame)."""
    m = load_manifest(shard_dir)
    where = shard_jpegs(m)
    images = [read_jpeg(where[k]) for p in m.pairs for k in (p.a, p.b)]
    out.write_bytes(pickle.dumps((images, [p.same for p in m.pairs]), protocol=2))
    return out


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run_cli(verify.run, argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_two_sets_one_table_json_roc_and_bin_equals_shards(
    shards: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pack = _pack_from(shards, tmp_path / "lfw.bin")
    assert import_main(["--bin", str(pack), "--out", str(tmp_path / "lfwbin")]) == 0
    capsys.readouterr()
    out_json, roc = tmp_path / "m.json", tmp_path / "roc.png"
    code, out, err = _run(
        [
            "--checkpoint",
            str(ckpt),
            "--sets",
            f"lfw={shards}",
            f"lfw_bin={tmp_path / 'lfwbin'}",
            "--json",
            str(out_json),
            "--roc",
            str(roc),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["set", "pairs", "accuracy"]
    assert [ln.split()[0] for ln in lines[1:]] == ["lfw", "lfw_bin"]
    sets = json.loads(out_json.read_text())["sets"]
    assert METRIC_KEYS <= set(sets["lfw"]) and METRIC_KEYS <= set(sets["lfw_bin"])
    # Same faces, same pairs, same folds (the pack's 10 contiguous folds are the manifest's).
    for k in ("accuracy_mean", "accuracy_std", "auc", "threshold", "tar_at_far_1e-3"):
        assert sets["lfw"][k] == pytest.approx(sets["lfw_bin"][k], abs=1e-9), k
    assert sets["lfw"]["num_pairs"] == 40 and sets["lfw"]["num_faces"] == 30
    assert roc.stat().st_size > 1000


def test_eval_lfw_is_the_lfw_preset(
    shards: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """lfw.py prints and writes what verify.py computes for the set (same figures to the last bit),
    with its own line and JSON, on the manifest's pairs and on a pairs file alike."""
    pf = _view2(tmp_path / "v2.txt")
    for pairs, set_pairs in (([], []), (["--pairs", str(pf)], ["--pairs", f"lfw={pf}"])):
        capsys.readouterr()
        assert (
            lfw_main(
                [
                    "--checkpoint",
                    str(ckpt),
                    "--shards",
                    str(shards),
                    "--json",
                    str(tmp_path / "l.json"),
                    "--quiet",
                    *pairs,
                ]
            )
            == 0
        )
        line = capsys.readouterr().out.strip()
        code, _, err = _run(
            [
                "--checkpoint",
                str(ckpt),
                "--sets",
                f"lfw={shards}",
                "--json",
                str(tmp_path / "v.json"),
                "--quiet",
                *set_pairs,
            ],
            capsys,
        )
        assert code == 0, err
        a = json.loads((tmp_path / "l.json").read_text())
        v = json.loads((tmp_path / "v.json").read_text())
        b = v["sets"]["lfw"]
        assert {k: a[k] for k in b if k != "seconds"} == {k: b[k] for k in b if k != "seconds"}
        assert (a["model"], a["flip"]) == (v["model"], v["flip"])
        assert line == (
            f"LFW ACC: {b['accuracy_mean']:.4f} +- {b['accuracy_std']:.4f}  "
            f"(same: {b['same_accuracy']:.4f}, diff: {b['diff_accuracy']:.4f})  "
            f"AUC {b['auc']:.4f}  threshold {b['threshold']:.4f}  "
            f"TAR@FAR=1e-3 {b['tar_at_far_1e-3']:.3f}"
        )
    assert b["num_pairs"] == 12 and b["pairs_source"] == str(pf)


def test_only_the_faces_the_pairs_use_are_embedded(shards: Path) -> None:
    rows: list[int] = []

    def spy(images: torch.Tensor) -> np.ndarray:
        rows.append(len(images))
        return images.mean(dim=(2, 3)).numpy()

    ps = prepare_set("lfw", load_manifest(shards))
    r = evaluate_set(spy, ps, batch_size=4, show_progress=False)
    used = {k for p in load_manifest(shards).pairs for k in (p.a, p.b)}
    assert sum(rows) == 2 * len(used) == 2 * 30  # flip doubles; Person_J_0009 is never read
    assert r.metrics["num_faces"] == 30


def _view2(path: Path, folds: int = 2, n: int = 3) -> Path:
    lines = [f"{folds}\t{n}"]
    for f in range(folds):
        lines += [f"{NAMES[(f * n + k) % 10]}\t1\t2" for k in range(n)]
        lines += [f"{NAMES[(f * n + k) % 10]}\t1\t{NAMES[(f * n + k + 1) % 10]}\t3" for k in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_view2_view1_and_plain_list(
    shards: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "--checkpoint",
        str(ckpt),
        "--sets",
        f"mine={shards}",
        "--quiet",
        "--json",
        str(tmp_path / "m.json"),
    ]

    def metrics() -> dict:
        return json.loads((tmp_path / "m.json").read_text())["sets"]["mine"]

    code, _, err = _run(base + ["--pairs", f"mine={_view2(tmp_path / 'v2.txt')}"], capsys)
    assert code == 0, err
    assert metrics()["num_pairs"] == 12 and len(metrics()["fold_accuracies"]) == 2
    v1 = tmp_path / "v1.txt"
    body = _view2(tmp_path / "tmp.txt", 1, 8).read_text().splitlines()[1:]
    v1.write_text("8\n" + "\n".join(body) + "\n")
    code, _, err = _run(base + ["--pairs", f"mine={v1}"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--folds" in err
    code, _, err = _run(base + ["--pairs", f"mine={v1}", "--folds", "4"], capsys)
    assert code == 0, err
    assert metrics()["num_pairs"] == 16 and len(metrics()["fold_accuracies"]) == 4
    plain = tmp_path / "plain.txt"
    plain.write_text(
        "# mine\n"
        + "\n".join(
            [f"{n}/{n}_0001.jpg {n}/{n}_0002.jpg 1" for n in NAMES[:5]]
            + [f"{a}/{a}_0001.jpg {b}/{b}_0003.jpg 0" for a, b in zip(NAMES[:5], NAMES[5:], strict=True)]
        )
        + "\n"
    )
    code, _, err = _run(base + ["--pairs", f"mine={plain}", "--folds", "5"], capsys)
    assert code == 0, err
    assert metrics()["num_pairs"] == 10 and len(metrics()["fold_accuracies"]) == 5


def test_folds_split_keeps_every_fold_balanced() -> None:
    pairs = [Pair(f"a{i}", f"b{i}", i < 10, 0) for i in range(20)]  # 10 genuine then 10 impostor
    out = split_folds(pairs, 5)
    assert [p.fold for p in out] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] * 2


def test_absent_image_one_line_or_skipped_and_counted(
    shards: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pf = _view2(tmp_path / "v2.txt")
    pf.write_text(pf.read_text().replace("Person_A\t1\t2", "Person_A\t1\t7", 1))  # no Person_A_0007
    base = ["--checkpoint", str(ckpt), "--sets", f"lfw={shards}", "--pairs", f"lfw={pf}", "--quiet"]
    code, _, err = _run(base, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "Person_A__Person_A_0007" in err and "--skip-missing" in err and f"{pf}:2:" in err
    code, _, err = _run(base + ["--skip-missing", "--json", str(tmp_path / "m.json")], capsys)
    assert code == 0, err
    assert "lfw: skipped 1 pairs" in err
    m = json.loads((tmp_path / "m.json").read_text())["sets"]["lfw"]
    assert m["skipped_pairs"] == 1 and m["num_pairs"] == 11


def test_one_kind_of_pairs_refused(
    shards: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "same.txt"
    plain.write_text("\n".join(f"{n}/{n}_0001.jpg {n}/{n}_0002.jpg 1" for n in NAMES) + "\n")
    code, _, err = _run(
        [
            "--checkpoint",
            str(ckpt),
            "--sets",
            f"x={shards}",
            "--pairs",
            f"x={plain}",
            "--folds",
            "2",
            "--quiet",
        ],
        capsys,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "all 10 pairs are same-person pairs" in err and "AUC" in err


def test_argument_mistakes_are_one_line(
    shards: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_shards(tmp_path / "square", size=(112, 112))
    for argv, text in [
        (["--sets", "lfw"], "expected NAME=PATH"),
        (["--sets", f"a={shards}", f"a={shards}"], "named twice"),
        (["--sets", f"a={shards}", "--pairs", f"b={shards}"], "no set named 'b'"),
        (["--sets", f"a={shards}", f"b={other}"], "one model takes one face size"),
        (["--sets", f"a={tmp_path / 'nothing'}"], "no shard manifest"),
    ]:
        code, _, err = _run(["--checkpoint", str(ckpt), *argv, "--quiet"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and text in err, (argv, err)
    with pytest.raises(UserError, match="pairs file not found"):
        verify.run(["--checkpoint", str(ckpt), "--sets", f"a={shards}", "--pairs", f"a={tmp_path / 'x.txt'}"])


def test_headerless_lfw_lines_and_plain_lists_are_told_apart(tmp_path: Path) -> None:
    from eval.verification.pairsets import read_any_pairs

    lfw = tmp_path / "headerless.txt"
    lfw.write_text("Person_A 1 2\nPerson_A 1 Person_B 3\n")
    plain = tmp_path / "plain.txt"
    plain.write_text(
        "Person_A/Person_A_0001.jpg Person_A/Person_A_0002.jpg true\n"
        "Person_A__Person_A_0001 Person_B__Person_B_0003 0\n"
    )  # sample keys work too
    for path in (lfw, plain):
        pairs, lines = read_any_pairs(path)
        assert [(p.a, p.b, p.same, p.fold) for p in pairs] == [
            (_key("Person_A", 1), _key("Person_A", 2), True, 0),
            (_key("Person_A", 1), _key("Person_B", 3), False, 0),
        ], path
        assert lines == [1, 2]
    plain.write_text("a.jpg b.jpg maybe\n")
    with pytest.raises(UserError, match=r"plain.txt:1: expected 'path_a path_b same'"):
        read_any_pairs(plain)


def test_a_damaged_face_is_one_line_through_the_shards_reader(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests._damage import flip_jpeg_byte

    shards = make_shards(tmp_path / "lfw")
    key = _key("Person_A", 1)
    flip_jpeg_byte(shard_jpegs(load_manifest(shards))[key].shard, key)
    code, _, err = _run(["--checkpoint", str(ckpt), "--sets", f"lfw={shards}", "--quiet"], capsys)
    assert code == 2 and "crc32" in err.lower() and len(err.strip().splitlines()) == 2  # log + error


@pytest.mark.slow
def test_onnx_in_parallel_batches_scores_what_the_checkpoint_scores(
    shards: Path, ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Slow: a dynamo ONNX export (tens of seconds on 2 busy cores) and three evaluations."""
    from eval.export_onnx import main as export_main

    onnx = tmp_path / "tiny.onnx"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(onnx)]) == 0
    figures = []
    for model in (
        ["--checkpoint", str(ckpt)],
        ["--onnx", str(onnx), "--parallel", "2", "--batch-size", "3"],
        ["--onnx", str(onnx), "--parallel", "1"],
    ):
        argv = [*model, "--sets", f"lfw={shards}", "--json", str(tmp_path / "m.json"), "--quiet"]
        code, _, err = _run(argv, capsys)
        assert code == 0, err
        figures.append(json.loads((tmp_path / "m.json").read_text())["sets"]["lfw"])
    for m in figures[1:]:
        for k in ("accuracy_mean", "auc", "threshold"):
            assert m[k] == pytest.approx(figures[0][k], abs=1e-5), k
