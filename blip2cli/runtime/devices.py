"""Where tensors live and in which precision: one dtype table, one spelling, one ``auto`` rule."""

from __future__ import annotations

import os

import torch

from .dist import init_distributed
from .errors import Blip2Error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The short spellings recipes and users also write.
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_CHOICES = ("auto", *DTYPES)


def dtype_name(name: str) -> str:
    """The canonical name (``float32``, ``bfloat16``, ``float16``) of a dtype spelled either way."""
    name = ALIASES.get(name, name)
    if name not in DTYPES:
        raise Blip2Error(f"unknown dtype {name!r}: expected auto, float32, bfloat16 or float16")
    return name


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a name spelled either way."""
    return DTYPES[dtype_name(name)]


def auto_dtype(device: torch.device) -> torch.dtype:
    """The one ``auto`` rule: bfloat16 on a GPU that has it, float16 on an older GPU, float32 elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a name, an alias, ``auto`` (or None) or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return auto_dtype(device)
    return dtype_of(dtype)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a training precision; None for float32 (no autocast)."""
    dtype = dtype_of(precision)
    return None if dtype == torch.float32 else dtype


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device from ``auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``;
    one that this machine lacks is a one-line error."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise Blip2Error(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Blip2Error(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise Blip2Error(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise Blip2Error("device 'mps' requested but it is not available here")
    return dev


def launched() -> bool:
    """Whether a launcher (torchrun, deepspeed) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_device(requested: str | torch.device | None) -> torch.device:
    """The device of this process: under a launcher, after joining the process group, the rank's GPU
    (or ``requested`` on a machine without one); in a plain process, ``requested``."""
    if launched():
        ranked = init_distributed(with_deepspeed=False)
        if ranked.type == "cuda":
            return ranked
    return resolve_device(requested)


def memory_record(device: torch.device) -> dict[str, float]:
    """The memory figure of a training step: on CUDA the peak allocated since the last call (``cuda_memory_gb``,
    the counter is then reset), elsewhere the process's peak resident set so far (``rss_gb``)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return {"cuda_memory_gb": peak / 1e9}
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss_gb": peak * (1 if sys.platform == "darwin" else 1024) / 1e9}  # bytes on macOS, KiB on Linux
