"""One-line errors for users' mistakes, and the wrapper every command runs its `main` under."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A mistake in a user's arguments, files or config. The message names the file or key."""


class CliParser(argparse.ArgumentParser):
    """argparse whose mistakes are a UserError (one line through run_cli), not a usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def run_cli(main_fn: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's `main`; a UserError becomes one line on stderr and exit code 2.

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
