"""Run directories: provenance, ``step-NNNNNN`` checkpoints, an atomic ``latest`` pointer, pruning."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

STEP = re.compile(r"^step-(\d{6,})$")


def step_dir(run: Path, step: int) -> Path:
    return run / f"step-{step:06d}"


def write_provenance(run: Path, recipe: dict[str, Any], argv: list[str]) -> None:
    """The resolved recipe, the command lines and the versions (rank 0, at every start)."""
    import torch
    import transformers

    from .. import __version__

    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    with open(run / "command.txt", "a") as f:  # one line per start: the first run, then each resume
        f.write(" ".join(argv) + "\n")
    (run / "version.json").write_text(json.dumps({
        "blip2": __version__, "git": _git_sha(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__}, indent=2))


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def latest(run: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    link = run / "latest"
    if link.is_symlink() or link.exists():
        target = link.resolve()
        return target if target.is_dir() else None
    return None


def point_latest(run: Path, target: Path) -> None:
    """Make ``run/latest`` name ``target`` (a sibling), replacing any older pointer in one rename."""
    tmp = run / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.name)
    os.replace(tmp, run / "latest")


def prune(run: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` checkpoints (never the one ``latest`` names)."""
    if keep_last <= 0:
        return
    steps = sorted((int(m.group(1)), p) for p in run.iterdir() if (m := STEP.match(p.name)) and p.is_dir())
    current = latest(run)
    for _, path in steps[:-keep_last]:
        if current is None or path.resolve() != current:
            shutil.rmtree(path, ignore_errors=True)


def clear_partial(run: Path) -> None:
    """Remove checkpoints a killed run left half-written."""
    for p in run.glob(".step-*.partial"):
        shutil.rmtree(p, ignore_errors=True)


def partial_dir(run: Path, step: int) -> Path:
    return run / f".step-{step:06d}.partial"


def append_metrics(run: Path, record: dict[str, Any]) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def command_line() -> list[str]:
    return [Path(sys.argv[0]).name, *sys.argv[1:]]
