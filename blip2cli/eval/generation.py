"""Benchmarks that generate text (VQA, GQA, captioning): run a model over the items into a results file."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import checked, load_recipe
from ..models.decoding import Decoding, flat_key, holds_decoding
from ..runtime.errors import Blip2Error
from .data import ZeroShot
from .paper import PaperFigures
from .runner import Item, run_sharded

# What of the decoding shapes a benchmark's predictions, as its provenance records it (the names and order of the
# flat recipes of old, so that runs made before ``decoding:`` still continue).
PROVENANCE = ("prompt", "num_beams", "max_new_tokens", "min_new_tokens", "length_penalty",
              "decoder_only_length_penalty", "repetition_penalty")


@holds_decoding
@dataclass
class GenerationEval:
    """Prompt and decoding of a benchmark, its zero-shot protocol and the paper's figures (``recipes/eval/*.yaml``).

    ``generation`` names the generation recipe (``recipes/generate/<name>.yaml``) whose decoding the benchmark
    uses, as the VQA benchmarks name ``vqa``; ``decoding`` holds settings of the benchmark's own, put over it. What
    neither sets is the model's (its generation recipe): a prompt left unset is the model's own prompt.
    """

    batch_size: int = checked(ge=1)
    generation: str | None = None
    # the generation recipe of a model fine-tuned for the benchmark, whose Q-Former reads the question (its own
    # prompt, "Question: {} Answer:"), in place of ``generation``
    finetuned_generation: str | None = None
    decoding: Decoding = field(default_factory=Decoding)
    lemmatize: bool = False  # OK-VQA: lemmatise answers before scoring (LAVIS, spaCy en_core_web_sm)
    zero_shot: ZeroShot = field(default_factory=ZeroShot)
    paper: PaperFigures = field(default_factory=PaperFigures)  # the paper's figures, shown beside the scores
    # the flat keys of recipes written before ``decoding:`` (and ``--set num_beams=2``): fields of ``decoding``
    prompt: str | None = flat_key()
    num_beams: int | None = flat_key()
    max_new_tokens: int | None = flat_key()
    min_new_tokens: int | None = flat_key()
    length_penalty: float | None = flat_key()
    decoder_only_length_penalty: float | None = flat_key()
    repetition_penalty: float | None = flat_key()
    beam_scoring: str | None = flat_key()

    def __post_init__(self) -> None:
        self.own_decoding = replace(self.decoding)  # the benchmark's own settings, before any generation recipe
        if self.generation:
            self.decoding = self.decoding.over(load_recipe(Decoding, f"generate/{self.generation}"))

    def for_model(self, reads_questions: bool) -> GenerationEval:
        """These settings for a model: one whose Q-Former reads the question (a VQA fine-tune) decodes with
        ``finetuned_generation`` under the benchmark's own settings."""
        if not (reads_questions and self.finetuned_generation):
            return self
        chosen = copy.copy(self)
        chosen.generation = self.finetuned_generation
        chosen.decoding = self.own_decoding.over(load_recipe(Decoding, f"generate/{self.finetuned_generation}"))
        return chosen

    def provenance(self) -> dict[str, Any]:
        """What of these settings shapes the predictions: the prompt and decoding (not the batch size, the
        scorer's lemmatiser or the zero-shot protocol's files, which the provenance records otherwise)."""
        recorded = {name: getattr(self.decoding, name) for name in PROVENANCE}
        unused = () if self.decoding.sample else ("top_p", "top_k", "seed")  # they shape only sampling
        others = {k: v for k, v in self.decoding.given().items() if k not in PROVENANCE + unused}
        if others.get("beam_scoring") == "transformers":  # how runs made before the setting decoded
            del others["beam_scoring"]
        return {**recorded, **others}


class _Images:
    """Opens each batch's images once per item; an unreadable image is reported once and its items skipped."""

    def __init__(self, on_skip: Callable[[str], None] | None) -> None:
        self.on_skip, self.bad = on_skip, set()

    def open(self, batch: list[Item]) -> dict[int, Any]:
        """The images that opened, by their item's position in ``batch``; items of one image share its one opening
        (and so its one pass through the ViT and Q-Former)."""
        from ..images import open_rgb

        opened, by_path = {}, {}
        for i, it in enumerate(batch):
            if it.image in self.bad:
                continue
            if it.image not in by_path:
                try:
                    by_path[it.image] = open_rgb(it.image)
                except Blip2Error as e:
                    if self.on_skip is None:
                        raise
                    self.bad.add(it.image)
                    self.on_skip(str(e))
                    continue
            opened[i] = by_path[it.image]
        return opened


def predict(model, items: list[Item], settings: GenerationEval, out: Path, key: str, field: str,
            show_progress: bool = True, on_skip: Callable[[str], None] | None = None) -> Path:
    """Generate for every item (sharded, resumable) and write ``out/predictions.json``; returns its path.

    With ``on_skip``, an unreadable image is passed to it as ``PATH: reason`` (once) and its items get no
    prediction; without, it is an error.
    """
    from ..runtime.progress import progress
    from ..runtime import dist

    if not model.can_generate:
        raise Blip2Error(f"{model.checkpoint.source} cannot generate text: VQA and captioning need a model with an LLM")
    template = settings.decoding.prompt if settings.decoding.prompt is not None else model.defaults.prompt or ""
    decoding = {k: v for k, v in settings.decoding.given().items() if k != "prompt"}  # over the model's recipe
    images = _Images(on_skip)

    def run(batch: list[Item]) -> list[str | None]:
        opened = images.open(batch)
        if not opened:
            return [None] * len(batch)
        prompts = [template.format(batch[i].text) if "{}" in template else template for i in opened]
        questions = [batch[i].text for i in opened] if "{}" in template and model.reads_questions else None
        texts = model.generate(list(opened.values()), prompts, batch_size=len(opened), questions=questions,
                               **decoding)
        by_position = dict(zip(opened, texts))
        return [by_position.get(i) for i in range(len(batch))]

    share = len(items[dist.rank()::dist.world_size()])
    with progress(f"rank {dist.rank()}" if dist.world_size() > 1 else "evaluating", total=share) as advance:
        run_sharded(items, run, out, key, field, settings.batch_size, advance if show_progress else lambda n: None,
                    group=lambda it: str(it.image))
    return out / "predictions.json"
