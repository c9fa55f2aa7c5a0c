"""YAML read with bounds (common/bounded_yaml.py): an anchor bomb, deep nesting, a recursive alias or
an oversized file in --config (or an override) is refused at once in one line naming it; anchors
used as intended still load."""

from __future__ import annotations

import time
import tracemalloc

import pytest
import yaml

from common.bounded_yaml import MAX_BYTES, MAX_NODES, BoundedLoader, expanded_size
from common.cli import UserError
from trainer.config import load_config

SYNTH = ["data.source=synthetic", "schedule.steps=3"]


def anchor_bomb(levels: int = 9) -> str:
    """Each anchor is nine aliases of the one before: 9**9 (387 million) strings once expanded."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "model:\n  kwargs:\n" + "".join(f"    {line}\n" for line in lines)


def refused(path_or_none, overrides=()) -> str:
    """The UserError line of load_config."""
    with pytest.raises(UserError) as info:
        load_config(path_or_none, [*SYNTH, *overrides])
    return str(info.value)


def test_an_anchor_bomb_in_the_config_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(anchor_bomb())
    tracemalloc.start()
    start = time.perf_counter()
    try:
        message = refused(path)
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message == f"{path}: refused: its aliases expand to more than {MAX_NODES} values (an anchor bomb?)"
    assert seconds < 2 and peak < 20 * 2**20  # was: 2.9 GB and MemoryError after 30 s


def test_an_anchor_bomb_in_an_override_is_refused():
    bomb = (
        "["
        + ", ".join(f"&a{i} [" + ", ".join([f"*a{i - 1}" if i else "1"] * 9) + "]" for i in range(8))
        + "]"
    )
    message = refused(None, [f"model.kwargs.x={bomb}"])
    assert message.startswith("override 'model.kwargs.x=[") and message.endswith("(an anchor bomb?)")


@pytest.mark.parametrize(
    "text, says",
    [
        ("model:\n  kwargs:\n    x: " + "[" * 1000 + "]" * 1000 + "\n", "nested more than 64 levels deep"),
        (
            "model:\n  kwargs: &k\n    x: *k\n",
            "an alias refers to a node that contains it (a recursive alias)",
        ),
    ],
)
def test_deep_or_recursive_yaml_is_one_line_not_a_recursion_error(tmp_path, text, says):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert refused(path) == f"{path}: refused: {says}"


def test_an_oversized_config_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("schedule: {steps: 3}\n" + "#" * MAX_BYTES + "\n")
    message = refused(path)
    assert message.startswith(f"{path}: refused: {MAX_BYTES + 22} bytes, more than the {MAX_BYTES}")


def test_anchors_used_as_intended_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "data: {source: synthetic}\nschedule: {steps: 3}\noptim: {lr: 0.05}\n"
        "validation:\n  sets: {a: &shards /data/lfw, b: *shards}\n"
    )
    cfg = load_config(path)
    assert cfg.validation.sets == {"a": "/data/lfw", "b": "/data/lfw"} and cfg.optim.lr == 0.05


def test_expanded_size_counts_each_alias_as_the_nodes_it_repeats():
    node = yaml.compose("[&a [1, 2], *a, *a]", Loader=BoundedLoader)
    assert expanded_size(node) == 1 + 3 * 3
    node = yaml.compose("{k: &v [x], j: *v}", Loader=BoundedLoader)
    assert expanded_size(node) == 1 + (1 + 2) * 2
