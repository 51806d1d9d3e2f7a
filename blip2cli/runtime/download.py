"""Files from URLs: streamed with an md5, written atomically, through a mirror when one is set, never
when offline.

Environment:

- ``BLIP2_MIRROR`` (or its older name ``BLIP2_ANNOTATIONS_MIRROR``): a URL prefix (``http://host:port`` or
  ``https://proxy/some/path``) that replaces the scheme and host of every URL, keeping its path; for
  mirrors, caching proxies and tests.
- ``BLIP2_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``: never download.
- ``BLIP2_CACHE``: where ``cached_download`` keeps files (default ``~/.cache/blip2``).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import BinaryIO

from .errors import Blip2Error
from .io import atomic_open
from .progress import progress

MIRROR_ENV = "BLIP2_MIRROR"
OLD_MIRROR_ENV = "BLIP2_ANNOTATIONS_MIRROR"
OFFLINE_ENV = ("BLIP2_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TIMEOUT_S = 60.0
CHUNK = 1 << 20
USER_AGENT = "blip2cli/0.1 (+python urllib)"


class DownloadFailed(Blip2Error):
    """A URL could not be fetched; the message is only the reason, for callers to say what to do."""


def offline() -> bool:
    """Nothing may be downloaded: ``BLIP2_OFFLINE``, ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set."""
    return any(os.environ.get(name, "0").lower() in ("1", "true", "yes") for name in OFFLINE_ENV)


def effective_url(url: str) -> str:
    """``url``, with its scheme and host replaced by the mirror's when one is set."""
    mirror = (os.environ.get(MIRROR_ENV) or os.environ.get(OLD_MIRROR_ENV) or "").strip()
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    return mirror.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


def url_name(url: str) -> str:
    """The file name at the end of a URL's path."""
    return Path(urllib.parse.urlsplit(url).path).name


def copy_hashing(src: BinaryIO, dst: BinaryIO | None, advance: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` (if any) in chunks: the md5 hex digest and the size of what went through."""
    digest, size = hashlib.md5(usedforsecurity=False), 0
    for chunk in iter(lambda: src.read(CHUNK), b""):
        if dst is not None:
            dst.write(chunk)
        digest.update(chunk)
        size += len(chunk)
        if advance is not None:
            advance(len(chunk))
    return digest.hexdigest(), size


def file_md5(path: Path) -> str:
    """The md5 hex digest of a file, read in chunks."""
    with Path(path).open("rb") as f:
        return copy_hashing(f, None)[0]


def stream(url: str, out: BinaryIO, label: str) -> str:
    """Stream ``url`` (as given: apply ``effective_url`` first) into ``out``, with a progress bar named
    ``label``; its md5. Any network failure is a ``DownloadFailed`` giving the reason."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            length = int(response.headers.get("Content-Length") or 0)
            bar = progress(f"downloading {label}", total=length) if length else nullcontext(None)
            with bar as advance:
                digest, received = copy_hashing(response, out, advance)
    except urllib.error.HTTPError as e:
        raise DownloadFailed(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadFailed(f"cannot reach the server ({_reason(e.reason)})") from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, truncated responses, a full disk
        raise DownloadFailed(f"download failed ({_reason(e)})") from None
    if length and received != length:
        raise DownloadFailed(f"download incomplete ({received} of {length} bytes)")
    return digest


def _reason(error: object) -> str:
    text = str(error).strip().replace("\n", " ")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def cache_root() -> Path:
    return Path(os.environ.get("BLIP2_CACHE", Path.home() / ".cache" / "blip2"))


def cached_download(url: str, md5: str | None = None) -> Path:
    """A file from a URL, kept under ``$BLIP2_CACHE``: downloaded once, atomically, checked against ``md5``
    when given. Offline, a file not in the cache is a one-line error saying where to put it."""
    root = cache_root()
    target = root / url_name(url)
    if target.exists():
        return target
    if offline():
        raise Blip2Error(f"{target.name} is not cached in {root} and offline mode is set "
                         f"({', '.join(OFFLINE_ENV[:2])}); download {url} there")
    try:
        with atomic_open(target) as f:
            digest = stream(effective_url(url), f, target.name)
            if md5 and digest != md5:
                raise DownloadFailed(f"md5 {digest}, expected {md5}")
    except DownloadFailed as e:
        raise Blip2Error(f"could not download {url} ({e}); put the file at {target}") from None
    return target
