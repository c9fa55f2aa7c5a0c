"""Two ranks through torchrun (gloo, CPU): disjoint, complete, equal batch counts, uneven shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests._loader_util import make_shards

ROOT = Path(__file__).resolve().parents[2]
WORKER = ["-m", "tests._loader_dist_worker"]  # a module run from the repository root (see tests/__init__.py)


def test_two_ranks_split_every_sample_once_with_equal_batches(tmp_path):
    # 3 shards of 37/50/13 samples = 100; 2 ranks x batch 8 = 16 per global step -> 7 batches each,
    # 112 slots: 12 samples (the permutation's first 12) padded into the last global batch.
    n = 100
    shards = make_shards(tmp_path / "shards", [37, 50, 13], num_classes=n)  # label == sample number
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *WORKER,
        str(shards),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for backend in ("torch", "dali"):
        orders = {}
        for epoch in (0, 1):
            per_rank = [[x for batch in r[f"{backend}_e{epoch}"] for x in batch] for r in ranks]
            assert [len(r[f"{backend}_e{epoch}"]) for r in ranks] == [7, 7]
            assert [r[f"{backend}_len"] for r in ranks] == [7, 7]
            both = per_rank[0] + per_rank[1]
            assert sorted(set(both)) == list(range(n)), "every sample is seen"
            # exactly once, except the 12 padding slots, which repeat samples
            assert len(both) - len(set(both)) == 7 * 16 - n
            # the padding is confined to the last global batch: before it, the ranks are disjoint
            head = per_rank[0][:48] + per_rank[1][:48]
            assert len(set(head)) == len(head)
            orders[epoch] = per_rank[0]
        assert orders[0] != orders[1], "the order changes with the epoch"
    # both backends follow the same order
    assert ranks[0]["torch_e0"] == ranks[0]["dali_e0"] and ranks[1]["torch_e1"] == ranks[1]["dali_e1"]
