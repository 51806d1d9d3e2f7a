"""Checkpoints that prove they are whole and hold nothing that runs.

A step directory ends with ``manifest.json``, written last: every file's size and SHA-256. Reading a
checkpoint back first checks the manifest, then reads each pickled ``.pt`` file weights-only (tensors
and plain data, plus the few DeepSpeed records listed in ``SAFE_GLOBALS``): no file can run code.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch

from .runtime.errors import Blip2Error
from .runtime.io import atomic_write_text, fsync_dir

MANIFEST = "manifest.json"
TRAINER = "trainer/"  # the optimiser and data state of a training checkpoint, beside the model
FORMAT = "blip2-checkpoint-manifest"

# Classes and functions a weights-only read may build besides torch's own: DeepSpeed's optimizer records
# (a loss scaler, the ZeRO stage, fragment offsets) and numpy arrays (trainer state of blip2 <= 0.1).
SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
)


class CorruptCheckpoint(Blip2Error):
    """A checkpoint that is incomplete or damaged (a killed save, a truncated copy, a full disk)."""


class UnsafeCheckpoint(Blip2Error):
    """A checkpoint file that would build Python objects beyond tensors and plain data when read."""


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(root: Path, step: int) -> int:
    """Flush every file under ``root``, then record their sizes and hashes in ``root/manifest.json``
    (the last file written). Returns the checkpoint's size in bytes."""
    files = {}
    for path in _files(root):
        fsync_file(path)
        files[path.relative_to(root).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    text = json.dumps({"format": FORMAT, "version": 1, "step": step, "files": files}, indent=1)
    atomic_write_text(root / MANIFEST, text)
    for directory in {root, *((root / name).parent for name in files)}:
        fsync_dir(directory)
    return sum(entry["size"] for entry in files.values())


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of a checkpoint, None when it has none; a damaged one is a ``CorruptCheckpoint``."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError("not a blip2 checkpoint manifest")
    except (ValueError, OSError, AttributeError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable ({e})") from None
    return manifest


def checkpoint_size(root: Path) -> int | None:
    """Bytes a verified checkpoint takes, from its manifest (None without one)."""
    try:
        manifest = read_manifest(root)
    except CorruptCheckpoint:
        return None
    return sum(int(e.get("size", 0)) for e in manifest["files"].values()) if manifest else None


def verify(root: Path, require_manifest: bool = True, with_trainer: bool = True) -> bool:
    """Check ``root`` against its manifest, then that no pickled file holds more than weights-only data.

    ``with_trainer=False`` checks the model's files only (loading a model never reads ``trainer/``, which
    holds the optimiser state, several times the model's size). Returns whether a manifest was checked
    (False only with ``require_manifest=False``). A missing, truncated or altered file raises
    ``CorruptCheckpoint``; code in a pickle raises ``UnsafeCheckpoint``.
    """
    def wanted(name: str) -> bool:
        return with_trainer or not name.startswith(TRAINER)

    manifest = read_manifest(root)
    if manifest is None and require_manifest:
        raise CorruptCheckpoint(f"{root}: no {MANIFEST} (not written by a finished save)")
    present = [p for p in _files(root) if wanted(p.relative_to(root).as_posix())]
    if manifest is not None:
        _check_files(root, {k: v for k, v in manifest["files"].items() if wanted(k)}, present)
    for path in present:
        if path.suffix in (".pt", ".pth", ".bin"):
            check_pickle(path)
    return manifest is not None


def _check_files(root: Path, files: dict[str, Any], present: list[Path]) -> None:
    for name, entry in files.items():
        path = root / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{path}: missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise CorruptCheckpoint(f"{path}: {size} bytes, the manifest says {entry.get('size')}")
        if sha256_file(path) != entry.get("sha256"):
            raise CorruptCheckpoint(f"{path}: contents differ from the manifest (SHA-256)")
    extra = [p.relative_to(root).as_posix() for p in present if p.relative_to(root).as_posix() not in files]
    if extra:
        raise CorruptCheckpoint(f"{root / extra[0]}: not in the manifest")


def _unsafe(path: Path, detail: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(f"{path}: refused to read it: it holds Python objects beyond tensors and plain data "
                            f"({detail}); checkpoints blip2 writes never do")


def check_pickle(path: Path) -> None:
    """Refuse a torch file whose pickle names any global outside torch's weights-only set and ``SAFE_GLOBALS``
    (read statically: nothing is executed)."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None:  # torch < 2.5: the weights-only read itself is the check
        return
    try:
        names = set(scan(str(path))) - set(SAFE_GLOBALS)
    except Exception as e:  # not a torch zip file, or a pickle that cannot be parsed
        raise _unsafe(path, f"unreadable pickle: {_first_line(e)}") from None
    if names:
        raise _unsafe(path, ", ".join(sorted(names)[:3]))


def _safe_objects() -> list[Any]:
    """``SAFE_GLOBALS`` of the packages already imported (DeepSpeed only where it runs the training)."""
    objects = []
    for name in SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        if module.split(".")[0] not in sys.modules:
            continue
        try:
            objects.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue  # e.g. DeepSpeed not installed, or another numpy layout
    return objects


def weights_only_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load`` that builds tensors and plain data only (and ``SAFE_GLOBALS``), never running code."""
    objects = _safe_objects()
    context = getattr(torch.serialization, "safe_globals", None)
    try:
        if context is None:  # torch < 2.5
            torch.serialization.add_safe_globals(objects)
            return torch.load(path, map_location=map_location, weights_only=True)
        with context(objects):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise _unsafe(Path(path), found.group(1) if found else "a weights-only read failed") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
