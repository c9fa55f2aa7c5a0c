"""`--image-size` (shards/format.py, every command that takes it): a typo that asks for a huge crop
is refused in one line before anything is allocated, not by OpenCV running out of memory."""

from __future__ import annotations

import argparse

import pytest

from common.cli import run_cli
from preprocess import build_shards
from shards.format import parse_image_size


@pytest.mark.parametrize("text", ["11200", "112x96000", "2000000000", "1025", "15", "112x8"])
def test_sizes_outside_16_to_1024_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"sides 16\.\.1024"):
        parse_image_size(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("112", (112, 112)), ("112x96", (112, 96)), ("1024", (1024, 1024)), ("16,16", (16, 16))],
)
def test_sizes_in_range_are_read(text: str, size: tuple[int, int]) -> None:
    assert parse_image_size(text) == size


def test_build_shards_refuses_a_huge_size_in_one_line(tmp_path, capsys) -> None:
    argv = [
        "folders",
        "--aligned",
        "--root",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
        "--image-size",
        "11200",
    ]
    assert run_cli(build_shards.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--image-size" in err and "sides 16..1024, not '11200'" in err
