"""Caption and question cleaning, as LAVIS's ``blip_caption`` and ``blip_question`` processors do it."""

from __future__ import annotations

import re

# LAVIS's character class: . ! " ( ) * # : ; ~  (commas, apostrophes, '?' and '-' are kept)
_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50, prompt: str = "") -> str:
    """Clean a caption exactly as LAVIS's ``blip_caption`` processor (``BlipCaptionProcessor.pre_caption``).

    Lowercase, each of ``. ! " ( ) * # : ; ~`` replaced by a space, runs of whitespace collapsed,
    trailing newline and surrounding spaces stripped, the first ``max_words`` words kept, ``prompt``
    prepended.
    """
    text = _PUNCT.sub(" ", caption.lower())
    text = _SPACES.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return prompt + text


def pre_question(question: str, max_words: int = 50) -> str:
    """Clean a question exactly as LAVIS's ``blip_question`` processor: the same characters deleted (not
    replaced by spaces), lowercase, right-stripped, the first ``max_words`` words kept."""
    text = _PUNCT.sub("", question.lower())
    text = text.rstrip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text
