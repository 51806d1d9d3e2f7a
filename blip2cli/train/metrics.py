"""``metrics.jsonl``: one JSON line per optimiser step, repaired when a run (re)opens it.

Opening drops a torn last line (a crash or a full disk mid-write) and every row after the step the run
continues from, so a resumed run never holds two rows for one step; the rewrite is atomic. An append
that fails leaves the file as it was before that row.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ..runtime.errors import Blip2Error
from ..runtime.io import atomic_write_text

NAME = "metrics.jsonl"


def _rows(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The parseable rows of a metrics file's bytes and how many lines were not."""
    rows, bad = [], 0
    for line in data.decode(errors="replace").splitlines():
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError
            rows.append(row)
        except ValueError:
            bad += 1
    return rows, bad


def repair(run: Path, through_step: int) -> None:
    """Keep the whole rows up to ``through_step`` (one per step, the last written), atomically."""
    path = run / NAME
    if not path.exists():
        return
    data = path.read_bytes()
    rows, bad = _rows(data)
    later = sum(r["step"] > through_step for r in rows)
    kept = {r["step"]: r for r in rows if r["step"] <= through_step}
    repeated = len(rows) - later - len(kept)
    if not (bad or later or repeated or (data and not data.endswith(b"\n"))):
        return
    atomic_write_text(path, "".join(json.dumps(kept[s]) + "\n" for s in sorted(kept)))
    notes = ([f"{bad} unreadable line(s) (a torn write)"] if bad else []) + (
        [f"{later} row(s) after step {through_step}, where this run continues"] if later else []) + (
        [f"{repeated} repeated row(s)"] if repeated else [])
    if notes:
        print(f"{path}: dropped {' and '.join(notes)}", file=sys.stderr)


class MetricsLog:
    """Appends whole rows to ``run/metrics.jsonl`` (rank 0)."""

    def __init__(self, run: Path, through_step: int) -> None:
        run.mkdir(parents=True, exist_ok=True)
        repair(run, through_step)
        self.path = run / NAME
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict[str, Any]) -> None:
        """Write one row; if the write fails, cut the file back to where it was and raise a one-line error."""
        data = (json.dumps(record) + "\n").encode()
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass  # the next open drops the torn line
            raise Blip2Error(f"{self.path}: could not append the row of step {record.get('step')} "
                             f"({e.strerror or e}); the file is as it was before it") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
