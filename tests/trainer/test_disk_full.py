"""The trainer's writes (metrics, checkpoints, config): a run folder that cannot take more bytes
(disk full, quota) is one error line, whichever file hits it, and leaves no temporary file.

The limit is RLIMIT_FSIZE with SIGXFSZ ignored: a write past it fails with an OSError (EFBIG),
as a full disk fails with ENOSPC, without needing a small filesystem.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys

import pytest

from tests._trainer_util import MAIN, ROOT, env, tiny_overrides


def _run_with_file_limit(args: list[str], limit: int) -> subprocess.CompletedProcess:
    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, str(MAIN), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
        cwd=ROOT,
        preexec_fn=limit_files,
    )


@pytest.mark.parametrize(
    ("limit", "every", "what"),
    [
        (2_000, 2, "checkpoint"),  # config and log fit, the first checkpoint does not
        (2_400, 100, "metrics log"),  # the log outgrows the limit before any checkpoint is due
    ],
)
def test_full_run_dir_is_one_line(tmp_path, limit, every, what):
    run = tmp_path / "run"
    proc = _run_with_file_limit(
        tiny_overrides(run, steps=12, **{"checkpoint.every_steps": every, "logging.display": "plain"}), limit
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"cannot write the {what}" in errors[0] and str(run) in errors[0]
    assert not list(run.rglob("*.tmp*"))
