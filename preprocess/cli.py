"""Small helpers shared by the preprocess commands: log lines, argument types, CPU count, progress bar."""

from __future__ import annotations

import argparse
import os
import sys


def log(msg: str) -> None:
    """A log line on stderr (results go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def positive(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def cpu_count() -> int:
    """The CPUs this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def progress(label: str, fields: tuple[str, ...] = ()):
    """A rich progress bar on stderr: label, bar, done/total, images/s over the run, elapsed, ETA, and
    one `{value} {name}` column per task field in `fields` (e.g. "rejects")."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:  # images per second over the whole run: steadier than rich's
            speed = task.completed / task.elapsed if task.elapsed else 0.0
            return Text(f"{speed:,.0f} img/s")

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn()]
    columns += [TextColumn("ETA"), TimeRemainingColumn()]
    columns += [TextColumn(f"{{task.fields[{name}]}} {name}") for name in fields]
    return Progress(*columns, console=Console(stderr=True), transient=False)
