"""bench/verify.py on a tiny ONNX model and hand-built LFW shards: eval/verify.py and the plain
onnxruntime loop score the same faces to the same accuracy, and the run prints their ratio."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.verify import main as bench_main
from tests._eval_util import build_lfw_shards, make_onnx


def test_verify_and_the_plain_loop_agree_and_the_ratio_is_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx = make_onnx(tmp_path / "tiny.onnx")
    shards = build_lfw_shards(tmp_path / "lfw")
    assert bench_main(["--onnx", str(onnx), "--shards", str(shards), "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(lines[-1])
    assert doc["accuracy_verify"] == doc["accuracy_plain"] < 0.95  # an imperfect model: it could differ
    assert len(doc["verify_runs_s"]) == len(doc["plain_runs_s"]) == 2
    order = [line.split()[2] for line in lines if line.startswith("run ")]
    assert order == ["verify:", "plain:", "plain:", "verify:"]  # ABBA
    ratio = re.search(r": (\d+\.\d\d)x faster \(median of 2 run\(s\) each\)$", lines[-2])
    assert ratio, lines[-2]
    assert float(ratio[1]) == pytest.approx(doc["speedup"], abs=0.006)  # the JSON's has 3 decimals
