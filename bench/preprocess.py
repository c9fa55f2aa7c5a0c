"""Shard building throughput against a naive loop: see preprocess/_bench.py for what is measured.

    python bench/preprocess.py [--images 1000] [--size 500x600] [--eye-px 60,200] [--workers N] [--detail]

Run as a script, this file's folder comes first on the import path and its name would shadow the
`preprocess` package; so it starts the benchmark in a child interpreter with `-P` (no script folder
on the path), where `preprocess` is the installed package.
"""

from __future__ import annotations

import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    return subprocess.run([sys.executable, "-P", "-m", "preprocess._bench", *args]).returncode


if __name__ == "__main__":
    raise SystemExit(main())
