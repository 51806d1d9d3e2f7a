"""Local directories for what users name: a path, a registry ``hf:`` entry or a Hugging Face hub id, from the
cache or downloaded (never when offline)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ..runtime.download import offline
from ..runtime.errors import Blip2Error
from . import registry


HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def local_dir_for(name: str) -> Path:
    """A directory for a local path, a registry ``hf:`` entry or a hub id."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    entry = registry.lookup(name)
    if entry is not None and entry.source.startswith("hf:"):
        return hub_snapshot(entry.where)
    if HUB_ID.match(name):
        return hub_snapshot(name)
    raise registry.unknown_name(name)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face hub id (``owner/name``)."""
    return bool(HUB_ID.match(name))
