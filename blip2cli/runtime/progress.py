"""Progress on stderr, never stdout: a rich bar on a terminal; on a pipe, nothing for item counts (logs
stay clean) and plain lines for training steps."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A function that advances a bar of ``total`` items by ``n``; a no-op when stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    with _bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
              transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _bar(*columns, transient: bool = False):
    from rich.console import Console
    from rich.progress import Progress

    return Progress(*columns, console=Console(stderr=True), transient=transient)


# the figures of a training record shown after the losses, each with its own format
_APART = {"step": None, "lr": None, "grad_norm": None, "samples_per_s": "{:.1f} samples/s",
          "tokens_per_s": "{:.0f} tokens/s", "cuda_memory_gb": "{:.1f} GB", "rss_gb": "{:.1f} GB RSS"}


def _format(record: dict[str, Any]) -> str:
    losses = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in _APART)
    figures = [form.format(record[k]) for k, form in _APART.items() if form and k in record]
    norm = f" | grad norm {record['grad_norm']:.3g}" if "grad_norm" in record else ""
    return f"step {record['step']} | {losses}{norm} | lr {record['lr']:.2e} | {' | '.join(figures)}"


class TrainProgress:
    """Training steps on stderr: a live line on a terminal, one plain line per log step otherwise (with
    ``enabled`` false, e.g. on ranks other than 0, nothing)."""

    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.tty = sys.stderr.isatty()
        self._bar = None
        self._started = time.perf_counter()

    def __enter__(self) -> TrainProgress:
        if self.enabled and self.tty:
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

            self._bar = _bar(TextColumn("{task.fields[line]}"), BarColumn(), TimeRemainingColumn())
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


def quiet_transformers() -> None:
    """transformers' loading bars and advice would clutter stderr; errors still surface as ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
