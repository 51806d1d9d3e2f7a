"""Decoding settings: one schema for a model's generation recipe (``recipes/generate/``), a benchmark's decoding
(``recipes/eval/``), CapFilt's captioner (``recipes/prepare/capfilt.yaml``) and the user's overrides.

A ``Decoding`` holds what was set; ``None`` is "not set", so settings layer: a model's recipe, then a benchmark's,
then the user's (``with_overrides``). Where nothing sets a field, the model that decodes uses its own default
(transformers' ``generate``). The numbers live in the recipes, never here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..runtime.errors import Blip2Error
from .search import SCORINGS


@dataclass
class Decoding:
    """How text is decoded. ``None``: not set here (a recipe below, or the decoder's own default, decides)."""

    prompt: str | None = None  # the text the LLM continues; "{}" marks where a benchmark's question goes
    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    # BLIP's lengths count the prompt's tokens (CapFilt's captioner); BLIP-2 generation takes *_new_tokens
    max_length: int | None = None
    min_length: int | None = None
    length_penalty: float | None = None
    # decoder-only LLMs (OPT), where LAVIS decodes them otherwise (VQA: 0 for OPT, -1 for Flan-T5); None: length_penalty
    decoder_only_length_penalty: float | None = None
    repetition_penalty: float | None = None
    top_p: float | None = None  # nucleus mass when sampling
    top_k: int | None = None  # the best tokens sampling starts from (0: all)
    sample: bool | None = None  # nucleus sampling instead of beam search
    num_captions: int | None = None  # texts per image
    # how beam search ranks finished texts: "transformers" (transformers 5.x: log-prob sum over the generated
    # tokens, EOS included, ** length_penalty) or "lavis" (transformers 4.26-4.33, which LAVIS ran for the paper's
    # numbers: over the whole hypothesis, BOS and prompt included, EOS excluded; min lengths count the prompt)
    beam_scoring: str | None = None
    seed: int | None = None  # sampling: texts are drawn from (seed, image, text index); None: from torch's RNG

    def given(self) -> dict[str, Any]:
        """The fields that are set."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def with_overrides(self, **overrides: Any) -> Decoding:
        """These settings with the user's ``overrides`` (``None`` means not given).

        ``sample=True`` without ``num_beams`` draws each text on its own (one beam): beam-sampling
        the recipe's beams would cap ``num_captions`` at the beam width and return near-duplicates.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - {f.name for f in fields(self)})
        if unknown:
            raise Blip2Error(f"unknown decoding setting(s) {', '.join(unknown)}: expected any of "
                             f"{', '.join(f.name for f in fields(self))}")
        if given.get("sample") and "num_beams" not in given:
            given["num_beams"] = 1
        return replace(self, **given)

    def over(self, base: Decoding) -> Decoding:
        """``base`` with what these settings set put over it (the same rules as ``with_overrides``)."""
        return base.with_overrides(**self.given())

    def generate_kwargs(self, decoder_only: bool = False) -> dict[str, Any]:
        """The keyword arguments of a BLIP-2 model's ``generate`` for these settings; a field that is not set is
        left to ``generate``'s own default. ``decoder_only``: the LLM is decoder-only (OPT)."""
        if self.max_length is not None or self.min_length is not None:
            raise Blip2Error("max_length and min_length count the prompt, as BLIP's CapFilt captioner does: "
                             "BLIP-2 generation takes max_new_tokens and min_new_tokens")
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens,
                              "repetition_penalty": self.repetition_penalty,
                              "num_return_sequences": self.num_captions, "num_beams": self.num_beams}
        if self.beam_scoring is not None and self.beam_scoring not in SCORINGS:
            raise Blip2Error(f"unknown beam scoring {self.beam_scoring!r}: expected {' or '.join(SCORINGS)}")
        kw["beam_scoring"] = self.beam_scoring
        if self.sample:
            if (self.num_beams or 1) != 1:
                raise Blip2Error(f"sampling draws each text on its own: --num-beams 1, not {self.num_beams}")
            kw.update(do_sample=True, top_p=self.top_p, top_k=self.top_k)
        else:
            if (self.num_captions or 1) > (self.num_beams or 1):
                raise Blip2Error(f"--num-captions {self.num_captions} needs at least as many beams "
                                 f"(--num-beams {self.num_beams}), or --sample")
            penalty = self.length_penalty
            if decoder_only and self.decoder_only_length_penalty is not None:
                penalty = self.decoder_only_length_penalty
            kw.update(do_sample=False, length_penalty=penalty)
        return {k: v for k, v in kw.items() if v is not None}


# --- recipes that hold a Decoding ---------------------------------------------------------------------------


def flat_key() -> Any:
    """A field of a recipe that holds ``decoding: Decoding``, standing for the field of that name in ``decoding``:
    the flat keys recipes (``num_beams: 5``), ``--set num_beams=2`` and code (``recipe.num_beams``) used before
    the decoding had a section of its own. Declare it after ``decoding``; ``holds_decoding`` makes it one."""
    return field(default=None, repr=False, compare=False, metadata={"alias_of": "decoding"})


class _DecodingKey:
    """Reads and sets one field of the instance's ``decoding``; setting ``None`` leaves it as it is."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj.decoding, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        if value is not None:
            obj.decoding = replace(obj.decoding, **{self.name: value})


def holds_decoding(cls: type) -> type:
    """Class decorator, over ``@dataclass``: every ``flat_key()`` field of ``cls`` becomes another name for the
    same field of the instance's ``decoding`` (one value, kept there)."""
    names = {f.name for f in fields(Decoding)}
    for f in fields(cls):
        if f.metadata.get("alias_of") == "decoding":
            if f.name not in names:
                raise TypeError(f"{cls.__name__}.{f.name}: Decoding has no field {f.name!r}")
            setattr(cls, f.name, _DecodingKey(f.name))
    return cls
