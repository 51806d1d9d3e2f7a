"""CapFilt's captioner: BLIP-large (transformers' ``BlipForConditionalGeneration``) with its own decode loop.

The loop samples ``num_captions`` captions per image as transformers' ``generate`` would with the repetition
penalty, the minimum length and :class:`NucleusSampler`, but faster: each image's keys and values are computed
once for all of its captions (:func:`shared_image_cross_attention`), the self-attention cache is preallocated,
and an image leaves the batch once its captions have ended. Sampling inverts the nucleus's cumulative
distribution at a uniform number hashed from (row seed, step), so a caption does not depend on the batch it is
decoded in or on the number of processes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ..runtime.errors import Blip2Error
from .decoding import Decoding
from .kv_cache import buffered_cache, decoder_cache_kwarg
from .sampling import NucleusSampler
from .search import Search, decode

# --- the captioner ---------------------------------------------------------------------------------------


class Captioner:
    """A transformers BLIP captioning model (``BlipForConditionalGeneration``) and its processor."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from .hub import local_dir_for

        path = local_dir_for(name)
        config = _read_config(path / "config.json", name)
        if config.get("model_type") != "blip":
            raise Blip2Error(f"{name}: not a BLIP captioning model (model_type {config.get('model_type')!r})")
        self.model = BlipForConditionalGeneration.from_pretrained(path, dtype=dtype, trust_remote_code=False)
        self.model = self.model.to(device).eval()
        self.processor = BlipProcessor.from_pretrained(path, trust_remote_code=False)
        self.device, self.dtype = device, dtype

    def pixels(self, image) -> torch.Tensor:
        return blip_pixels(self.processor.image_processor, image)

    @torch.no_grad()
    def sample(self, pixel_values: torch.Tensor, row_seeds: torch.Tensor, decoding: Decoding) -> list[str]:
        """``num_captions`` sampled captions per image, image-major, without the prompt.

        ``decoding``: the prompt, ``num_captions``, ``top_p`` and ``top_k`` (0 or unset: none), the lengths
        (``max_length``/``min_length`` counting the prompt's tokens as BLIP does, or ``max_new_tokens``/
        ``min_new_tokens``) and ``repetition_penalty``; a recipe holding its settings in ``.decoding`` will do.
        """
        decoding = getattr(decoding, "decoding", decoding)  # CapFiltRecipe holds its Decoding
        _check(decoding)
        prompt = decoding.prompt or ""
        embeds = self.model.vision_model(pixel_values=pixel_values.to(self.device, self.dtype))[0]
        tokens = self._decode(embeds, self._prompt_ids(prompt), row_seeds.to(self.device), decoding)
        texts = self.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [strip_prompt(t, prompt) for t in texts]

    def _decode(self, embeds: torch.Tensor, prompt: torch.Tensor, row_seeds: torch.Tensor,
                decoding: Decoding) -> torch.Tensor:
        """Token ids ``[images * n, <= max_length]`` (prompt included), as transformers' ``generate`` with the
        repetition penalty and minimum length followed by :class:`NucleusSampler` would give them (a finished caption
        is padded), except that an image leaves the batch once all of its captions have ended."""
        config = self.model.config.text_config
        images, n, length = embeds.shape[0], decoding.num_captions, prompt.shape[1]
        max_length, min_length = _lengths(decoding, length)
        search = Search(max_new_tokens=max_length - length, eos=(config.sep_token_id,), pad=config.pad_token_id,
                        num_return_sequences=n, min_new_tokens=max(0, min_length - length),
                        repetition_penalty=decoding.repetition_penalty,
                        sampler=NucleusSampler(decoding.top_p, row_seeds, decoding.top_k or 0),
                        sample_step_offset=length)
        decoder = self.model.text_decoder
        with shared_image_cross_attention(decoder, embeds) as attention:
            steps = BlipDecoderSteps(decoder, embeds, attention, prompt.expand(images, -1), max_length)
            new = decode(steps, steps.first_logits, search, history=prompt.expand(images, -1))
        return torch.cat([prompt.expand(len(new), -1), new], dim=1)

    def _prompt_ids(self, prompt: str) -> torch.Tensor:
        """``[1, P]``: as BLIP, the tokenised prompt with its first token made the decoder's BOS and the
        trailing [SEP] dropped."""
        ids = self.processor.tokenizer(prompt, return_tensors="pt")["input_ids"].clone()
        ids[:, 0] = self.model.config.text_config.bos_token_id
        return ids[:, :-1].to(self.device)



class BlipDecoderSteps:
    """BLIP's text decoder mid-decode (a ``search.Stepper``), attending to its images through
    :class:`SharedImageCrossAttention` and writing its self-attention cache into a preallocated buffer; the prompt
    runs once per image."""

    def __init__(self, decoder: torch.nn.Module, embeds: torch.Tensor, attention: _SharedImages,
                 prompt: torch.Tensor, capacity: int) -> None:
        self.decoder, self.embeds, self.attention = decoder, embeds, attention
        self.cache = buffered_cache(capacity)
        self.cache_kwargs = {decoder_cache_kwarg(decoder): self.cache, "use_cache": True}
        self.first_logits = decoder(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                    encoder_hidden_states=embeds, logits_to_keep=1,
                                    **self.cache_kwargs).logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        # the image states only switch cross-attention on: the shared modules hold each image's keys and values
        return self.decoder(input_ids=tokens[:, None], encoder_hidden_states=self.embeds,
                            **self.cache_kwargs).logits[:, -1]

    def reorder(self, rows: torch.Tensor, images: torch.Tensor | None = None) -> None:
        self.cache.reorder_cache(rows)
        if images is not None:
            self.attention.keep(images)
            self.embeds = self.embeds[images]


def _check(decoding: Decoding) -> None:
    """The captioner samples: settings it cannot follow are refused rather than ignored."""
    missing = [name for name in ("num_captions", "top_p") if getattr(decoding, name) is None]
    if decoding.max_length is None and decoding.max_new_tokens is None:
        missing.append("max_length (or max_new_tokens)")
    if missing:
        raise Blip2Error(f"the CapFilt captioner needs decoding settings {', '.join(missing)}")
    if decoding.sample is False or (decoding.num_beams or 1) != 1:
        raise Blip2Error("the CapFilt captioner samples each caption on its own: no beam search (num_beams 1, sample)")


def _lengths(decoding: Decoding, prompt_tokens: int) -> tuple[int, int]:
    """(max_length, min_length) counting the prompt's tokens, as BLIP's ``generate`` counts them."""
    longest = decoding.max_length if decoding.max_length is not None else prompt_tokens + decoding.max_new_tokens
    if decoding.min_length is not None:
        return longest, decoding.min_length
    return longest, prompt_tokens + decoding.min_new_tokens if decoding.min_new_tokens is not None else 0


class SharedImageCrossAttention(torch.nn.Module):
    """A BLIP decoder layer's cross-attention for rows that come in equal groups per image (the captions of
    one image, image-major): each image's keys and values are computed once and every row of its group
    attends to them, instead of each caption carrying a copy. The image tokens have no padding, so there
    is no mask; the arithmetic is the layer's own (scaled dot product, softmax, no dropout in eval)."""

    def __init__(self, attention: torch.nn.Module, image_embeds: torch.Tensor):
        super().__init__()
        self.query = attention.query
        self.heads, self.head_size = attention.num_attention_heads, attention.attention_head_size
        shape = (*image_embeds.shape[:-1], self.heads, self.head_size)
        self.keys = attention.key(image_embeds).view(shape).transpose(1, 2)
        self.values = attention.value(image_embeds).view(shape).transpose(1, 2)

    def keep(self, images: torch.Tensor) -> None:
        """Keep only the ``images`` (an index or mask) from now on."""
        self.keys, self.values = self.keys[images], self.values[images]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        rows, length, _ = hidden_states.shape
        images = self.keys.shape[0]
        if rows % images:
            raise ValueError(f"{rows} decoder rows do not split evenly over {images} images")
        query = self.query(hidden_states).view(images, rows // images * length, self.heads, self.head_size)
        context = torch.nn.functional.scaled_dot_product_attention(query.transpose(1, 2), self.keys, self.values)
        return context.transpose(1, 2).reshape(rows, length, self.heads * self.head_size), None


class _SharedImages:
    """The :class:`SharedImageCrossAttention` modules of one decoder, narrowed together."""

    def __init__(self, modules: list[SharedImageCrossAttention]):
        self.modules = modules

    def keep(self, images: torch.Tensor) -> None:
        for module in self.modules:
            module.keep(images)


@contextlib.contextmanager
def shared_image_cross_attention(decoder: torch.nn.Module, image_embeds: torch.Tensor) -> Iterator[_SharedImages]:
    """Within the block, ``decoder`` (a transformers ``BlipTextLMHeadModel``) attends to ``image_embeds`` through
    :class:`SharedImageCrossAttention` (the ``encoder_hidden_states`` it is given only switch cross-attention on);
    its own cross-attention modules are put back afterwards."""
    layers = decoder.bert.encoder.layer
    originals = [layer.crossattention.self for layer in layers]
    try:
        shared = [SharedImageCrossAttention(attention, image_embeds) for attention in originals]
        for layer, attention in zip(layers, shared):
            layer.crossattention.self = attention
        yield _SharedImages(shared)
    finally:
        for layer, attention in zip(layers, originals):
            layer.crossattention.self = attention


def blip_pixels(image_processor, image) -> torch.Tensor:
    """One image as the BLIP captioner's input, ``[3, H, W]``."""
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def strip_prompt(text: str, prompt: str) -> str:
    """The caption without the prompt it was generated after (BLIP drops its first ``len(prompt)`` characters)."""
    text, prompt = text.strip(), prompt.strip()
    if prompt and text.lower().startswith(prompt.lower()):
        text = text[len(prompt):]
    return text.strip()


def _read_config(path: Path, name: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise Blip2Error(f"{name}: no readable config.json in {path.parent}") from None
