"""blip2: BLIP-2 end to end — data, two-stage pretraining, fine-tuning, evaluation and generation."""

from __future__ import annotations

from .runtime import __version__


def load(name_or_path: str, device="auto", dtype="auto", llm: str | None = None, max_pixels: int | None = None,
         exif_transpose: bool = False):
    """Load a BLIP-2 model by local path, registry name or Hugging Face id; see ``blip2cli.api.Blip2``.

    ``max_pixels``: refuse larger images before decoding them (default ``blip2cli.images.MAX_PIXELS``);
    ``exif_transpose``: turn images upright by their EXIF orientation (off, as LAVIS).
    """
    from .api import load as _load
    from .images import MAX_PIXELS

    return _load(name_or_path, device=device, dtype=dtype, llm=llm,
                 max_pixels=MAX_PIXELS if max_pixels is None else max_pixels, exif_transpose=exif_transpose)


__all__ = ["load", "__version__"]
