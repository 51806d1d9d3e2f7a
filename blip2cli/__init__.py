"""blip2: BLIP-2 end to end — data, two-stage pretraining, fine-tuning, evaluation and generation."""

from __future__ import annotations

__version__ = "0.1.0"


def load(name_or_path: str, device="auto", dtype="auto", llm: str | None = None):
    """Load a BLIP-2 model by local path, registry name or Hugging Face id; see ``blip2cli.api.Blip2``."""
    from .api import load as _load

    return _load(name_or_path, device=device, dtype=dtype, llm=llm)


__all__ = ["load", "__version__"]
