"""Run directories: provenance, ``step-NNNNNN`` checkpoints, an atomic ``latest`` pointer, pruning, and
the lock that keeps a second run out."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .errors import Blip2Error
from .io import atomic_write_text, fsync_dir

STEP = re.compile(r"^step-(\d{6,})$")


def step_dir(run: Path, step: int) -> Path:
    return run / f"step-{step:06d}"


def write_provenance(run: Path, recipe: dict[str, Any], argv: list[str]) -> None:
    """The resolved recipe, the command lines and the versions (rank 0, at every start)."""
    import torch
    import transformers

    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
    with open(run / "command.txt", "a") as f:  # one line per start: the first run, then each resume
        f.write(" ".join(argv) + "\n")
    atomic_write_text(run / "version.json", json.dumps({
        "blip2": __version__, "git": _git_sha(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__}, indent=2))


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def step_of(path: Path) -> int | None:
    """The step of a ``step-NNNNNN`` checkpoint directory, or None for any other name."""
    m = STEP.match(path.name)
    return int(m.group(1)) if m else None


def step_dirs(run: Path) -> list[Path]:
    """The run's ``step-NNNNNN`` directories, newest first."""
    if not run.is_dir():
        return []
    found = [(step, p) for p in run.iterdir() if (step := step_of(p)) is not None and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def read_latest(run: Path) -> tuple[Path | None, str | None]:
    """What ``run/latest`` names, in either form it is written in: a symlink, or a text file holding the
    checkpoint's name (where symlinks are not supported; as DeepSpeed writes it). Returns the checkpoint
    (None when there is no pointer) and, when the pointer is broken, why."""
    link = run / "latest"
    if link.is_symlink():
        target = Path(os.readlink(link))
    elif link.is_file():
        try:
            name = link.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            return None, f"{link} is unreadable ({e})"
        if not name:
            return None, f"{link} is empty"
        target = Path(name)
    elif link.is_dir():
        return link, None
    else:
        return None, None
    target = target if target.is_absolute() else run / target
    if not target.is_dir():
        return None, f"{link} names {target}, which is not a directory"
    return target, None


def latest(run: Path) -> Path | None:
    """The checkpoint ``run/latest`` names, or None (no pointer, or a broken one)."""
    return read_latest(run)[0]


def point_latest(run: Path, target: Path) -> None:
    """Make ``run/latest`` name ``target`` (a sibling), replacing any older pointer in one rename: a
    symlink, or a text file holding the name where the file system has no symlinks."""
    tmp = run / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        tmp.symlink_to(target.name)
    except OSError:
        with open(tmp, "w") as f:
            f.write(target.name + "\n")
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, run / "latest")
    fsync_dir(run)


def prune(run: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` checkpoints (never the one ``latest`` names)."""
    if keep_last <= 0:
        return
    current = latest(run)
    for path in step_dirs(run)[keep_last:]:
        if current is None or path.resolve() != current.resolve():
            shutil.rmtree(path, ignore_errors=True)


def clear_partial(run: Path) -> None:
    """Remove what a killed process left half-done: checkpoints being written, directories being removed."""
    for p in [*run.glob(".step-*.partial"), *run.glob(".removed-*"), *run.glob(".latest.tmp")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def partial_dir(run: Path, step: int) -> Path:
    return run / f".step-{step:06d}.partial"


def has_checkpoints(run: Path) -> bool:
    link = run / "latest"
    return bool(step_dirs(run)) or link.is_symlink() or link.exists()


def clear_run(run: Path) -> list[str]:
    """Delete a run's checkpoints, ``latest``, metrics (with the TensorBoard events and the W&B run, whose next
    start is a new one) and command history (``--overwrite``): each is first renamed to ``.removed-*`` (one atomic
    step each), then deleted. Returns the names removed."""
    logs = [run / "metrics.jsonl", run / "tensorboard", run / "wandb", run / "wandb.json"]  # see train/loggers.py
    names = [p.name for p in [run / "latest", *logs, run / "command.txt", *step_dirs(run)]
             if p.is_symlink() or p.exists()]
    for i, name in enumerate(names):
        os.replace(run / name, run / f".removed-{i}-{name}")
    fsync_dir(run)
    clear_partial(run)
    return names


def set_aside_after(run: Path, step: int, current: Path | None) -> Path | None:
    """A run continuing from ``step``: move its checkpoints of later steps into ``run/superseded-<time>/`` (kept,
    never deleted: they belong to the continuation this one replaces, and the new steps would take their names)
    and point ``latest`` at ``current`` when it is one of the run's own. Returns that folder, if anything moved."""
    import time

    later = [p for p in step_dirs(run) if step_of(p) > step]
    aside = None
    if later:
        aside = run / time.strftime("superseded-%Y%m%d-%H%M%S", time.gmtime())
        aside.mkdir(exist_ok=True)
        for p in later:
            os.replace(p, aside / p.name)
    if current is not None and current.parent.resolve() == run.resolve() and step_of(current) is not None:
        point_latest(run, current)
    clear_partial(run)
    return aside


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``run/run.lock``, held until ``release`` or
    the process ends (the OS drops it however the process dies). The file names the holder."""

    NAME = "run.lock"

    def __init__(self, run: Path) -> None:
        self.path = run / self.NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise Blip2Error(f"{self.path}: cannot lock the run directory ({e.strerror})") from None
            raise Blip2Error(f"{self.path.parent} is in use by {holder} (lock {self.path}): one run per "
                             "directory; wait for it to end or stop it, or choose another --name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def command_line() -> list[str]:
    return [Path(sys.argv[0]).name, *sys.argv[1:]]
