"""Writes that never leave a half-written file or directory under its final name, and JSON reads whose
failures are one line naming the file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from .errors import Blip2Error


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``; it replaces ``path`` (after an fsync) only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Make the rename durable (where the file system lets a directory be synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write; it becomes ``path`` only if the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


@contextmanager
def atomic_dir(out: Path, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A temporary sibling directory that replaces ``out`` in one rename once the block has filled it.

    An existing ``out`` is replaced, unless ``keep(out)`` says it is complete already (e.g. written meanwhile
    by another run), in which case the new copy is dropped. A failed block leaves ``out`` as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if keep is not None and keep(out):
            return
        try:
            _replace_dir(tmp, out)
        except OSError:
            if keep is None or not keep(out):  # not another run's complete copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)


def read_json(path: Path, what: str | None = None, lines_ok: bool = False, hint: str = "") -> Any:
    """A JSON file (or, with ``lines_ok``, JSON lines as a list); every failure is one line naming the file.

    ``what`` names the file in the not-found message (``"annotations not found: PATH"``) and ``hint``
    says where to get it.
    """
    path = Path(path)
    hint = f"; {hint}" if hint else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Blip2Error(f"{what} not found: {path}{hint}" if what else f"{path}: no such file{hint}") from None
    except IsADirectoryError:
        raise Blip2Error(f"{path}: is a directory, not a JSON file") from None
    except UnicodeDecodeError:
        raise Blip2Error(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise Blip2Error(f"{path}: cannot read ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        error = e
    if lines_ok:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            pass
    raise Blip2Error(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})")
