"""What a model name designates, loaded: a local path (a checkpoint of ours or its run directory, a
transformers BLIP-2 directory, a LAVIS ``.pth``), then a registry name, then a Hugging Face hub id."""

from __future__ import annotations

from pathlib import Path

import torch

from ..runtime.download import cached_download
from ..runtime.errors import Blip2Error
from ..runtime.rundir import read_latest
from . import registry
from .assemble import Checkpoint
from .formats.hf import load_hf_dir
from .formats.lavis import load_lavis
from .formats.native import FORMAT_FILE, is_ours, load_ours, verify
from .hub import hub_snapshot, is_hub_id


def blip2_entry(name: str) -> registry.Entry | None:
    """The registry entry ``name`` designates, if any; an entry that is not a whole BLIP-2 model is refused."""
    entry = registry.lookup(name)
    if entry is not None and entry.kind != "blip2":
        what = {"tower": "vision tower", "llm": "language model", "captioner": "CapFilt captioner",
                "ranker": "CapFilt ranker"}.get(entry.kind, entry.kind)
        raise Blip2Error(f"{name} is a {what}, not a BLIP-2 model; `blip2 models` lists the BLIP-2 ones")
    return entry


def load_checkpoint(name: str, llm: str | None = None, dtype: torch.dtype | None = None) -> Checkpoint:
    """Load what ``name`` designates, in the documented resolution order."""
    path = Path(name).expanduser()
    if path.exists() or path.is_symlink():
        return _load_path(path, llm, dtype)
    entry = blip2_entry(name)
    if entry is not None:
        if entry.source.startswith("lavis:"):
                return load_lavis(cached_download(entry.where), llm=llm or entry.llm, vision=entry.vision, dtype=dtype,
                              generation=entry.generation, image_size=entry.image_size)
        return load_hf_dir(hub_snapshot(entry.where), dtype, generation=entry.generation)
    if is_hub_id(name):
        return load_hf_dir(hub_snapshot(name), dtype, generation="caption")
    raise registry.unknown_name(name)


def resolve_path(path: Path) -> Path:
    """The checkpoint a local path designates: a run directory, or its ``latest`` pointer in either form (a
    symlink or a text file naming the step), stands for the checkpoint it points at; anything else for itself.
    A broken pointer is an error naming it."""
    if path.name == "latest" and (path.is_symlink() or path.is_file()):
        run = path.parent
    elif path.is_dir() and not is_ours(path) and _has_pointer(path):
        run = path
    else:
        return path
    target, problem = read_latest(run)
    if problem is not None:
        raise Blip2Error(f"{problem}: there is no checkpoint to load")
    return target if target is not None else path


def _has_pointer(run: Path) -> bool:
    latest = run / "latest"
    return latest.is_symlink() or latest.exists()


def _load_path(path: Path, llm: str | None, dtype: torch.dtype | None) -> Checkpoint:
    path = resolve_path(path)
    if path.is_dir():
        if is_ours(path):
            verify(path)
            return load_ours(path, dtype)
        if (path / "config.json").exists():
            return load_hf_dir(path, dtype, generation="caption")
        raise Blip2Error(f"{path}: not a model directory (no {FORMAT_FILE}, latest or config.json)")
    if path.suffix in (".pth", ".pt", ".bin"):
        return load_lavis(path, llm=llm, dtype=dtype)
    raise Blip2Error(f"{path}: not a model (expected a directory or a LAVIS .pth file)")
