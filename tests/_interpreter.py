"""A test module's Triton cases under TRITON_INTERPRET=1, which must be set before triton is first
imported: `interpreter_results(module)` runs `python -m <module>` in a fresh interpreter and returns
case name -> "ok" or the case's traceback; the module's `__main__` calls `run_cases(globals())`,
which runs every `case_*` function and prints one JSON line per case. Each case is then its own
pytest item in the module, passing or failing with the case's own error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cases_in(namespace: dict) -> list[str]:
    return sorted(name for name in namespace if name.startswith("case_"))


def interpreter_results(module: str, timeout: int = 600) -> dict[str, str]:
    """case name -> "ok" or the case's traceback, from one interpreter subprocess."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record["case"]] = record["result"]
    assert results, f"the interpreter reported no case (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return results


def run_cases(namespace: dict) -> int:
    """Run every case_* of a module (in the subprocess); 1 when any failed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    failed = 0
    for name in cases_in(namespace):
        try:
            namespace[name]()
            result = "ok"
        except Exception:  # reported to the pytest item of this case, which fails with it
            result, failed = traceback.format_exc(), failed + 1
        print(json.dumps({"case": name, "result": result}), flush=True)
    return 1 if failed else 0
