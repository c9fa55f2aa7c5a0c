"""Command plumbing shared by every command: one-line errors for users' mistakes, the one way a
command ends, log lines, argument types, the CPU count and the progress bar.

Every command module has the same shape:

    def run(argv: Sequence[str] | None = None) -> int | None:   # raises UserError for a user's mistake
        args = CliParser(...).parse_args(argv)
        ...

    def main(argv: Sequence[str] | None = None) -> int:         # what tests and other code call
        return run_cli(run, argv)

    if __name__ == "__main__":
        raise SystemExit(main())
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A mistake in a user's arguments, files or config. The message names the file or key."""


class CliParser(argparse.ArgumentParser):
    """argparse whose mistakes are a UserError (one line through run_cli), not a usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def run_cli(main_fn: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's `run`; a UserError becomes one line on stderr and exit code 2.

    Anything else is a bug in this project and keeps its traceback.
    """
    try:
        return int(main_fn(argv) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def log(msg: str) -> None:
    """A log line on stderr (results go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def whole_number(minimum: int, what: str) -> Callable[[str], int]:
    """argparse type: a whole number of at least `minimum`; `what` names it in the error line."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive = whole_number(1, "a whole number of at least 1")


def cpu_count() -> int:
    """The CPUs this process may use (its affinity mask where the OS has one, so a container or
    `taskset` limit counts), the one count every command's worker default starts from."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def progress(label: str, fields: tuple[str, ...] = (), *, unit: str = "img", text_field: str | None = None):
    """The one progress bar of every command and benchmark, on stderr: label, bar, done/total,
    `unit`/s over the run, elapsed, ETA, one `{value} {name}` column per task field in `fields` (e.g.
    "rejects"), and the task field `text_field` as free text (the trainer's loss line). `label` may
    hold rich markup and `{task.description}`."""
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
        def render(self, task) -> Text:  # per second over the whole run: steadier than rich's
            speed = task.completed / task.elapsed if task.elapsed else 0.0
            return Text(f"{speed:,.0f} {unit}/s")

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn()]
    columns += [TextColumn("ETA"), TimeRemainingColumn()]
    columns += [TextColumn(f"{{task.fields[{name}]}} {name}") for name in fields]
    if text_field:
        columns.append(TextColumn(f"{{task.fields[{text_field}]}}"))
    # While the bar shows, rich sends what the program prints through its console (stderr, above
    # the bar); stdout only when it is the terminal too, so that results piped to a file stay there.
    return Progress(
        *columns, console=Console(stderr=True), refresh_per_second=4, redirect_stdout=sys.stdout.isatty()
    )
