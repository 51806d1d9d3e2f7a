"""Benchmarks that generate text (VQA, GQA, captioning): run a model over the items into a results file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Blip2Error
from .data import ZeroShot
from .runner import Item, run_sharded


@dataclass
class GenerationEval:
    """Prompt and decoding of a benchmark, and its zero-shot protocol (``blip2cli/recipes/eval/*.yaml``)."""

    prompt: str | None = None  # with "{}" for the question; None: the model's own prompt
    num_beams: int = 5
    max_new_tokens: int = 10
    min_new_tokens: int = 1
    length_penalty: float = 1.0  # encoder-decoder LLMs
    decoder_only_length_penalty: float = 1.0  # decoder-only LLMs (LAVIS uses other defaults for OPT)
    repetition_penalty: float = 1.0
    batch_size: int = 16
    lemmatize: bool = False  # OK-VQA: lemmatise answers before scoring (LAVIS, spaCy en_core_web_sm)
    zero_shot: ZeroShot = field(default_factory=ZeroShot)

    def provenance(self) -> dict[str, Any]:
        """What of these settings shapes the predictions: the prompt and decoding (not the batch size, the
        scorer's lemmatiser or the zero-shot protocol's files, which the provenance records otherwise)."""
        return {name: value for name, value in asdict(self).items()
                if name not in ("batch_size", "lemmatize", "zero_shot")}


class _Images:
    """Opens each batch's images once per item; an unreadable image is reported once and its items skipped."""

    def __init__(self, on_skip: Callable[[str], None] | None) -> None:
        self.on_skip, self.bad = on_skip, set()

    def open(self, batch: list[Item]) -> dict[int, Any]:
        """The images that opened, by their item's position in ``batch``."""
        from ..images import open_rgb

        opened = {}
        for i, it in enumerate(batch):
            if it.image in self.bad:
                continue
            try:
                opened[i] = open_rgb(it.image)
            except Blip2Error as e:
                if self.on_skip is None:
                    raise
                self.bad.add(it.image)
                self.on_skip(str(e))
        return opened


def predict(model, items: list[Item], settings: GenerationEval, out: Path, key: str, field: str,
            show_progress: bool = True, on_skip: Callable[[str], None] | None = None) -> Path:
    """Generate for every item (sharded, resumable) and write ``out/predictions.json``; returns its path.

    With ``on_skip``, an unreadable image is passed to it as ``PATH: reason`` (once) and its items get no
    prediction; without, it is an error.
    """
    from ..progress import progress
    from ..train import dist

    if not model.can_generate:
        raise Blip2Error(f"{model.checkpoint.source} cannot generate text: VQA and captioning need a model with an LLM")
    decoder_only = not model.net.language_model.is_encoder_decoder
    template = settings.prompt if settings.prompt is not None else model.defaults.prompt
    decoding: dict[str, Any] = dict(
        num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
        repetition_penalty=settings.repetition_penalty,
        length_penalty=settings.decoder_only_length_penalty if decoder_only else settings.length_penalty)
    images = _Images(on_skip)

    def run(batch: list[Item]) -> list[str | None]:
        opened = images.open(batch)
        if not opened:
            return [None] * len(batch)
        prompts = [template.format(batch[i].text) if "{}" in template else template for i in opened]
        texts = model.generate(list(opened.values()), prompts, batch_size=len(opened), **decoding)
        by_position = dict(zip(opened, texts))
        return [by_position.get(i) for i in range(len(batch))]

    share = len(items[dist.rank()::dist.world_size()])
    with progress(f"rank {dist.rank()}" if dist.world_size() > 1 else "evaluating", total=share) as advance:
        run_sharded(items, run, out, key, field, settings.batch_size, advance if show_progress else lambda n: None)
    return out / "predictions.json"
