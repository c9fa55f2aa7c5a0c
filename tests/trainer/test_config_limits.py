"""The upper bounds of trainer/config.py: a size that a config key makes the trainer allocate (or a
process count it makes it start) is refused in one line naming the key, before anything is built."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from common.cli import UserError
from trainer import config
from trainer.config import describe_config, load_config
from trainer.main import main

SYNTH = ["data.source=synthetic", "schedule.steps=3"]


def test_a_huge_batch_size_is_refused_before_anything_is_allocated(tmp_path, capsys):
    run = tmp_path / "run"
    tracemalloc.start()
    start = time.perf_counter()
    try:
        rc = main([*SYNTH, "run.devices=cpu", f"run.dir={run}", "loader.batch_size=1000000000"])
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rc == 2
    assert capsys.readouterr().err == (
        "error: override 'loader.batch_size=1000000000': 'loader.batch_size' "
        "must be in [1, 16384], got 1000000000\n"
    )
    assert seconds < 5 and peak < 50 * 2**20  # was: 7 GB asked for
    assert not run.exists()  # refused before the run folder is made


@pytest.mark.parametrize(
    "override, says",
    [
        ("validation.batch_size=100000", "'validation.batch_size' must be in [1, 16384], got 100000"),
        ("loader.workers=100000", "'loader.workers' must be in [0, 256], got 100000"),
        ("loader.source_workers=1000", "'loader.source_workers' must be in [0, 256], got 1000"),
        ("loader.prefetch=100000", "'loader.prefetch' must be in [1, 64], got 100000"),
        ("model.embedding_size=100000000", "'model.embedding_size' must be in [1, 8192], got 100000000"),
        (
            "data.synthetic.image_size=[112,100000]",
            "'data.synthetic.image_size' must be in [8, 1024], got [112, 100000]",
        ),
    ],
)
def test_other_sizes_have_upper_bounds(override, says):
    with pytest.raises(UserError) as info:
        load_config(None, [*SYNTH, override])
    assert str(info.value) == f"override '{override}': {says}"


def test_the_largest_allowed_values_are_accepted():
    cfg = load_config(None, [*SYNTH, "loader.batch_size=16384", "loader.workers=256", "loader.prefetch=64"])
    assert (cfg.loader.batch_size, cfg.loader.workers, cfg.loader.prefetch) == (16384, 256, 64)


def test_a_synthetic_set_larger_than_the_memory_is_refused(monkeypatch):
    monkeypatch.setattr(config, "_physical_memory", lambda: 2**30)  # a 1 GiB machine
    load_config(None, [*SYNTH, "data.synthetic.classes=16", "data.synthetic.per_class=8"])  # 19 MB: fits
    with pytest.raises(UserError) as info:
        load_config(None, [*SYNTH, "data.synthetic.classes=1000", "data.synthetic.per_class=100"])
    assert str(info.value) == (
        "override 'data.synthetic.classes=1000': 'data.synthetic' classes x "
        "per_class x image_size 1000 x 100 x 112x112 needs about 56.1 GiB to build, "
        "more than this machine's 1.0 GiB"
    )


def test_help_config_shows_the_bounds():
    rows = {line.split()[0]: line for line in describe_config().splitlines()}
    assert "in [1, 16384]" in rows["loader.batch_size"] and "in [0, 256]" in rows["loader.workers"]
