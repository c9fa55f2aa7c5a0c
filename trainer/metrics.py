"""Run logging on rank 0: metrics.jsonl, TensorBoard scalars (when installed), and a live display
(rich when stderr is a TTY, plain periodic lines otherwise)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from common.cli import UserError, progress
from common.fileio import atomic_write_text

METRICS_NAME = "metrics.jsonl"


def drop_superseded(path: Path, start_step: int) -> int:
    """Keep only the records of steps up to `start_step` in metrics.jsonl; returns how many went.

    A run resumed from step S repeats the steps after S and logs them again: the records an earlier
    attempt wrote for them (and a line a kill cut short) describe a state that no longer exists.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            keep = int(record["step"]) <= start_step
        except (ValueError, TypeError, KeyError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += line.strip() != ""
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept), what="metrics log")
    return dropped


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int,
        display: str = "auto",
        tensorboard: str = "auto",
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self._progress = None
        self._task = None
        self._tb = None
        self._file = None
        self.dropped = 0  # superseded records removed from metrics.jsonl (rank 0)
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_NAME
        self.dropped = drop_superseded(self.path, start_step)
        try:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        except OSError as err:
            raise UserError(f"{self.path}: cannot write the metrics log ({err.strerror or err})") from None
        if tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                if tensorboard == "on":
                    print("warning: logging.tensorboard=on but tensorboard is not installed", file=sys.stderr)
        mode = display
        if mode == "auto":
            mode = "rich" if sys.stderr.isatty() else "plain"
        self.mode = mode
        if mode == "rich":
            self._progress = progress("[bold]train", unit="step", text_field="info")
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
            self._progress.start()

    def eta_s(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.t0) / done * (self.total - step)

    def log(self, record: dict[str, Any]) -> None:
        """One record per log interval (or validation); written to metrics.jsonl and shown."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        assert self._file is not None
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as err:  # disk full or quota in run.dir
            raise UserError(f"{self.path}: cannot write the metrics log ({err.strerror or err})") from None
        step = int(record.get("step", 0))
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._tb.add_scalar(k, v, step)
        text = self._format(record)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=text)
        elif self.mode == "plain":
            eta = self.eta_s(step)
            eta_txt = f" eta {eta:.0f}s" if eta == eta else ""
            print(f"step {step}/{self.total} {text}{eta_txt}", file=sys.stderr, flush=True)

    @staticmethod
    def _format(r: dict[str, Any]) -> str:
        parts = []
        for key, fmt in (
            ("epoch", "ep {:.2f}"),
            ("loss", "loss {:.4f}"),
            ("distill_loss", "distill {:.4f}"),
            ("batch_acc", "acc {:.3f}"),
            ("lr", "lr {:.2e}"),
            ("images_per_s", "{:.0f} img/s"),
            ("data_wait", "wait {:.0%}"),
            ("val_accuracy", "LFW {:.4f}"),
            ("skipped_total", "skipped {}"),
        ):
            if key in r and r[key] is not None and not (key == "skipped_total" and r[key] == 0):
                parts.append(fmt.format(r[key]))
        return "  ".join(parts)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:  # the unwritten tail after a failed write: log() has said so
                pass
