"""Benchmarks that generate text (VQA, GQA, captioning): run a model over the items into a results file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Blip2Error
from .data import check_images
from .runner import Item, run_sharded


@dataclass
class GenerationEval:
    """Prompt and decoding of a benchmark (``blip2cli/recipes/eval/*.yaml``)."""

    prompt: str | None = None  # with "{}" for the question; None: the model's own prompt
    num_beams: int = 5
    max_new_tokens: int = 10
    min_new_tokens: int = 1
    length_penalty: float = 1.0  # encoder-decoder LLMs
    decoder_only_length_penalty: float = 1.0  # decoder-only LLMs (LAVIS uses other defaults for OPT)
    repetition_penalty: float = 1.0
    batch_size: int = 16
    lemmatize: bool = False  # OK-VQA: lemmatise answers before scoring (LAVIS, spaCy en_core_web_sm)


def predict(model, items: list[Item], settings: GenerationEval, out: Path, key: str, field: str,
            show_progress: bool = True) -> Path:
    """Generate for every item (sharded, resumable) and write ``out/predictions.json``; returns its path."""
    from ..cli.progress import progress
    from ..train import dist

    if not model.can_generate:
        raise Blip2Error(f"{model.checkpoint.source} cannot generate text: VQA and captioning need a model with an LLM")
    check_images([it.image for it in items])
    decoder_only = not model.net.language_model.is_encoder_decoder
    template = settings.prompt if settings.prompt is not None else model.defaults.prompt
    decoding: dict[str, Any] = dict(
        num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
        repetition_penalty=settings.repetition_penalty,
        length_penalty=settings.decoder_only_length_penalty if decoder_only else settings.length_penalty)

    def run(batch: list[Item]) -> list[str]:
        prompts = [template.format(it.text) if "{}" in template else template for it in batch]
        return model.generate([it.image for it in batch], prompts, batch_size=len(batch), **decoding)

    share = len(items[dist.rank()::dist.world_size()])
    with progress(f"rank {dist.rank()}" if dist.world_size() > 1 else "evaluating", total=share) as advance:
        run_sharded(items, run, out, key, field, settings.batch_size, advance if show_progress else lambda n: None)
    return out / "predictions.json"
