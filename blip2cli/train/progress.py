"""Training progress on stderr: a live rich line on a terminal, plain lines otherwise (rank 0 only)."""

from __future__ import annotations

import sys
import time
from typing import Any


def _format(record: dict[str, Any]) -> str:
    losses = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "lr", "samples_per_s"))
    return f"step {record['step']} | {losses} | lr {record['lr']:.2e} | {record['samples_per_s']:.1f} samples/s"


class TrainProgress:
    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.tty = sys.stderr.isatty()
        self._bar = None
        self._started = time.perf_counter()

    def __enter__(self) -> TrainProgress:
        if self.enabled and self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.fields[line]}"), BarColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True))
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, line="starting")
        return self

    def update(self, record: dict[str, Any], log: bool) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=record["step"], line=_format(record))
        elif log:
            done = record["step"] - self.start
            elapsed = time.perf_counter() - self._started
            eta = elapsed / max(done, 1) * (self.total - record["step"])
            print(f"{_format(record)} | eta {eta / 60:.1f} min", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
