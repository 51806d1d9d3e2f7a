"""Resolve what a user names (path, registry name, hub id) to a loaded checkpoint, honouring offline mode."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

from ..errors import Blip2Error
from . import checkpoints, registry

HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def offline() -> bool:
    """Nothing may be downloaded: ``BLIP2_OFFLINE``, ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set."""
    return any(os.environ.get(name, "0").lower() in ("1", "true", "yes")
               for name in ("BLIP2_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_snapshot(repo_id: str, patterns: list[str] | None = None) -> Path:
    """A local snapshot of a hub repository (the files matching ``patterns``, by default a transformers
    model's): the cache when it has one, a download otherwise."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = patterns or HF_PATTERNS
    try:
        if not offline() and not _cached(repo_id, patterns):
            announce_download(repo_id)
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline()))
    except (LocalEntryNotFoundError, FileNotFoundError):
        how = f"run `hf download {repo_id}` on a machine with network (or copy its cache here)"
        if offline():
            raise Blip2Error(f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {how}") from None
        raise Blip2Error(f"{repo_id} could not be downloaded and is not cached; {how}") from None
    except RepositoryNotFoundError:
        raise Blip2Error(f"{repo_id}: no such repository on the Hugging Face hub") from None
    except HfHubHTTPError as e:
        raise Blip2Error(f"{repo_id}: hub error ({str(e).splitlines()[0]})") from None
    except OSError as e:  # network unreachable and similar
        raise Blip2Error(f"{repo_id}: could not reach the hub and it is not cached ({e.__class__.__name__})") from None


def _cached(repo_id: str, patterns: list[str]) -> bool:
    """Whether the Hugging Face cache already holds a snapshot of ``repo_id`` (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return False
    return True


def announce_download(repo_id: str) -> None:
    """One line on stderr before a model that is not cached is downloaded: which one, and about how big."""
    entry = registry.by_repo(repo_id)
    size = f" (about {entry.size_gb:g} GB)" if entry is not None and entry.size_gb else ""
    print(f"downloading {repo_id}{size} from the Hugging Face hub into its cache; "
          "HF_HUB_OFFLINE=1 forbids downloads", file=sys.stderr, flush=True)


def download_url(url: str) -> Path:
    """A file from a URL, cached under ``$BLIP2_CACHE`` (default ``~/.cache/blip2``)."""
    root = Path(os.environ.get("BLIP2_CACHE", Path.home() / ".cache" / "blip2"))
    target = root / url.rsplit("/", 1)[-1]
    if target.exists():
        return target
    if offline():
        raise Blip2Error(f"{target.name} is not cached in {root} and HF_HUB_OFFLINE is set; download {url} there")
    root.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except Exception as e:
        raise Blip2Error(f"could not download {url} ({e.__class__.__name__}); put the file at {target}") from None
    return target


def local_dir_for(name: str) -> Path:
    """A directory for a local path, a registry ``hf:`` entry or a hub id."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    entry = registry.lookup(name)
    if entry is not None and entry.source.startswith("hf:"):
        return hub_snapshot(entry.where)
    if _HUB_ID.match(name):
        return hub_snapshot(name)
    raise registry.unknown_name(name)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face hub id (``owner/name``)."""
    return bool(_HUB_ID.match(name))


def blip2_entry(name: str) -> registry.Entry | None:
    """The registry entry ``name`` designates, if any; an entry that is not a whole BLIP-2 model is refused."""
    entry = registry.lookup(name)
    if entry is not None and entry.kind != "blip2":
        what = {"tower": "vision tower", "llm": "language model", "captioner": "CapFilt captioner",
                "ranker": "CapFilt ranker"}.get(entry.kind, entry.kind)
        raise Blip2Error(f"{name} is a {what}, not a BLIP-2 model; `blip2 models` lists the BLIP-2 ones")
    return entry


def load_checkpoint(name: str, llm: str | None = None, dtype: torch.dtype | None = None) -> checkpoints.Checkpoint:
    """Load what ``name`` designates, in the documented resolution order."""
    path = Path(name).expanduser()
    if path.exists() or path.is_symlink():
        return _load_path(path, llm, dtype)
    entry = blip2_entry(name)
    if entry is not None:
        if entry.source.startswith("lavis:"):
            from .lavis import load_lavis

            return load_lavis(download_url(entry.where), llm=llm or entry.llm, vision=entry.vision, dtype=dtype,
                              generation=entry.generation, image_size=entry.image_size)
        return checkpoints.load_hf_dir(hub_snapshot(entry.where), dtype, generation=entry.generation)
    if is_hub_id(name):
        return checkpoints.load_hf_dir(hub_snapshot(name), dtype, generation="caption")
    raise registry.unknown_name(name)


def resolve_path(path: Path) -> Path:
    """The checkpoint a local path designates: a run directory, or its ``latest`` pointer in either form (a
    symlink or a text file naming the step), stands for the checkpoint it points at; anything else for itself.
    A broken pointer is an error naming it."""
    from ..train.rundir import read_latest

    if path.name == "latest" and (path.is_symlink() or path.is_file()):
        run = path.parent
    elif path.is_dir() and not checkpoints.is_ours(path) and _has_pointer(path):
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


def _load_path(path: Path, llm: str | None, dtype: torch.dtype | None) -> checkpoints.Checkpoint:
    path = resolve_path(path)
    if path.is_dir():
        if checkpoints.is_ours(path):
            checkpoints.verify(path)
            return checkpoints.load_ours(path, dtype)
        if (path / "config.json").exists():
            return checkpoints.load_hf_dir(path, dtype, generation="caption")
        raise Blip2Error(f"{path}: not a model directory (no {checkpoints.FORMAT_FILE}, latest or config.json)")
    if path.suffix in (".pth", ".pt", ".bin"):
        from .lavis import load_lavis

        return load_lavis(path, llm=llm, dtype=dtype)
    raise Blip2Error(f"{path}: not a model (expected a directory or a LAVIS .pth file)")
