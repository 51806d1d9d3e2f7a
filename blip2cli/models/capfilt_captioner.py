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
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ..runtime.errors import Blip2Error
from .decoding import Decoding

_MASK32 = 0xFFFFFFFF


# --- counter-based sampling ------------------------------------------------------------------------------


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x * constant) mod 2**32`` for int64 ``x`` in [0, 2**32), without int64 overflow."""
    hi, lo = constant >> 16, constant & 0xFFFF
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection of [0, 2**32) that scrambles every bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def uniform_at(seeds: torch.Tensor, step: int, draw: int = 0) -> torch.Tensor:
    """One uniform number in (0, 1) per row seed, a pure function of (seed, step, draw)."""
    x = _mix32(_mix32(seeds.to(torch.int64) & _MASK32) ^ (step & _MASK32))
    if draw:
        x = _mix32(x ^ _mul32(torch.full_like(x, draw), 0x9E3779B9))
    return ((x >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def row_seed(seed: int, key: str, index: int) -> int:
    """A stable 32-bit seed for caption ``index`` of sample ``key``."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class NucleusSampler:
    """A logits processor that draws the next token as transformers' sampling does with ``TopKLogitsWarper``
    then ``TopPLogitsWarper``, and returns scores whose argmax is that token (0 there, -inf elsewhere), so
    greedy decoding with it is sampling.

    The nucleus is the most probable tokens (among the ``top_k`` best, when set) up to mass ``top_p``, the
    token that crosses it included. With ``top_k`` the draw inverts the nucleus's cumulative distribution over
    the ``top_k`` best tokens. Without it, a draw proposes a token from the whole distribution (inverting its
    cumulative sum in vocabulary order) and accepts it if the mass of the more probable tokens is below
    ``top_p``, i.e. if it is in the nucleus: accepted tokens follow the nucleus's renormalised distribution,
    and as the nucleus holds at least ``top_p`` of the mass one proposal almost always suffices, with no sort
    over the vocabulary (rows still rejected after ``proposals`` tries, possible only at tiny ``top_p``, are
    drawn from the sorted nucleus). Every uniform number is a pure function of (row seed, step, proposal), so
    a caption does not depend on the batch it is decoded in."""

    def __init__(self, top_p: float, row_seeds: torch.Tensor, top_k: int = 0, proposals: int = 16):
        self.top_p, self.top_k, self.row_seeds, self.proposals = top_p, top_k, row_seeds, proposals

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = self.draw(scores, self.row_seeds.to(scores.device), input_ids.shape[1])
        out = torch.full(scores.shape, -torch.inf, dtype=torch.float32, device=scores.device)
        return out.scatter_(1, chosen[:, None], 0.0)

    def draw(self, scores: torch.Tensor, row_seeds: torch.Tensor, step: int) -> torch.Tensor:
        """The token drawn for each row of ``scores`` ``[rows, vocab]``."""
        scores = scores.float()
        if 0 < self.top_k < scores.shape[-1]:
            best, order = scores.topk(self.top_k, dim=-1)  # sorted, most probable first
            return order.gather(1, self._in_order(best.softmax(dim=-1), row_seeds, step, 0)).squeeze(1)
        probs = scores.softmax(dim=-1)
        cumulative = probs.cumsum(dim=-1)
        chosen, accepted = self._propose(probs, cumulative, row_seeds, step, 0)
        pending = (~accepted).nonzero().squeeze(1)
        for proposal in range(1, self.proposals):
            if not len(pending):
                return chosen
            token, accepted = self._propose(probs[pending], cumulative[pending], row_seeds[pending], step, proposal)
            chosen[pending[accepted]] = token[accepted]
            pending = pending[~accepted]
        if len(pending):
            ordered, order = probs[pending].sort(dim=-1, descending=True)
            index = self._in_order(ordered, row_seeds[pending], step, self.proposals)
            chosen[pending] = order.gather(1, index).squeeze(1)
        return chosen

    def _propose(self, probs: torch.Tensor, cumulative: torch.Tensor, row_seeds: torch.Tensor, step: int,
                 proposal: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A token per row drawn from ``probs``, and whether it lies in the nucleus."""
        target = uniform_at(row_seeds, step, proposal)[:, None] * cumulative[:, -1:]
        token = torch.searchsorted(cumulative, target).clamp(max=probs.shape[1] - 1)
        above = torch.where(probs > probs.gather(1, token), probs, 0.0).sum(dim=-1)
        return token.squeeze(1), above < self.top_p

    def _in_order(self, ordered: torch.Tensor, row_seeds: torch.Tensor, step: int, draw: int) -> torch.Tensor:
        """``[rows, 1]``: the position drawn from probabilities sorted most probable first, within the nucleus."""
        cumulative = ordered.cumsum(dim=-1)
        size = (cumulative - ordered < self.top_p).sum(dim=-1, keepdim=True).clamp(min=1)
        target = uniform_at(row_seeds, step, draw)[:, None] * cumulative.gather(1, size - 1)
        return torch.searchsorted(cumulative, target).clamp(max=size - 1)



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
        """Token ids ``[images * n, <= max_length]``, as transformers' ``generate`` with the repetition penalty and
        minimum length followed by :class:`NucleusSampler` would give them (a finished caption is padded), except
        that an image leaves the batch once all of its captions have ended."""
        from transformers import LogitsProcessorList, MinLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

        config = self.model.config.text_config
        eos, pad = config.sep_token_id, config.pad_token_id
        images, n = embeds.shape[0], decoding.num_captions
        max_length, min_length = _lengths(decoding, prompt.shape[1])
        processors = LogitsProcessorList()
        if decoding.repetition_penalty is not None:
            processors.append(RepetitionPenaltyLogitsProcessor(decoding.repetition_penalty))
        if min_length:
            processors.append(MinLengthLogitsProcessor(min_length, eos, device=self.device))
        sampler = NucleusSampler(decoding.top_p, row_seeds, decoding.top_k or 0)
        decoder = self.model.text_decoder
        tokens = prompt.repeat(images * n, 1)
        ended = torch.zeros(images * n, dtype=torch.bool, device=self.device)
        live = torch.arange(images * n, device=self.device)  # the rows still in the batch, image-major
        cache_kwarg = decoder_cache_kwarg(decoder)
        with shared_image_cross_attention(decoder, embeds) as attention:
            cache = self._prefill(prompt, embeds, n, max_length)
            while tokens.shape[1] < max_length:
                past = tokens[live]
                logits = decoder(input_ids=past[:, -1:], encoder_hidden_states=embeds, use_cache=True,
                                 **{cache_kwarg: cache}).logits[:, -1].float()
                drawn = sampler.draw(processors(past, logits), row_seeds[live], past.shape[1])
                step = torch.where(ended[live], pad, drawn)
                column = torch.full_like(ended, pad, dtype=tokens.dtype)
                column[live] = step
                tokens = torch.cat([tokens, column[:, None]], dim=1)
                ended[live] |= step == eos
                image_done = ended[live].view(-1, n).all(dim=1)
                if bool(image_done.all()):
                    break
                if bool(image_done.any()):
                    keep = ~image_done
                    live = live.view(-1, n)[keep].flatten()
                    attention.keep(keep)
                    cache.batch_select_indices(keep.repeat_interleave(n).nonzero().squeeze(1))
        return tokens

    def _prompt_ids(self, prompt: str) -> torch.Tensor:
        """``[1, P]``: as BLIP, the tokenised prompt with its first token made the decoder's BOS and the
        trailing [SEP] dropped."""
        ids = self.processor.tokenizer(prompt, return_tensors="pt")["input_ids"].clone()
        ids[:, 0] = self.model.config.text_config.bos_token_id
        return ids[:, :-1].to(self.device)

    def _prefill(self, prompt: torch.Tensor, embeds: torch.Tensor, n: int, capacity: int):
        """The decoder's self-attention cache after all but the last prompt token, computed once per image and
        then repeated for its ``n`` captions."""
        cache = _buffered_cache(capacity)
        if prompt.shape[1] < 2:
            return cache
        ids = prompt[:, :-1].repeat(embeds.shape[0], 1)
        decoder = self.model.text_decoder
        decoder(input_ids=ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=embeds, use_cache=True,
                logits_to_keep=1, **{decoder_cache_kwarg(decoder): cache})
        cache.batch_repeat_interleave(n)
        return cache


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


def decoder_cache_kwarg(decoder: torch.nn.Module) -> str:
    """The name under which ``decoder`` takes its key/value cache: ``cache`` in current transformers, where the
    older ``past_key_values`` is deprecated (and goes in 5.40), ``past_key_values`` in releases before the rename."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _buffered_cache(capacity: int):
    """A transformers ``DynamicCache`` whose layers write each step into a buffer of ``capacity`` positions rather
    than concatenating new keys and values at every step (copies that grow with the square of the length)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class BufferedLayer(DynamicLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.dtype, self.device, self.length = key_states.dtype, key_states.device, 0
                self.buffers = [x.new_empty((*x.shape[:2], capacity, x.shape[-1])) for x in (key_states, value_states)]
                self.is_initialized = True
            end = self.length + key_states.shape[-2]
            for buffer, x in zip(self.buffers, (key_states, value_states)):
                buffer[:, :, self.length:end] = x
            self.length = end
            self.keys, self.values = (buffer[:, :, :end] for buffer in self.buffers)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self._narrow([buffer.repeat_interleave(repeats, dim=0) for buffer in self.buffers])

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self._narrow([buffer[indices] for buffer in self.buffers])

        def _narrow(self, buffers: list[torch.Tensor]) -> None:
            self.buffers = buffers
            self.keys, self.values = (buffer[:, :, :self.length] for buffer in buffers)

    cache = DynamicCache()
    cache.layer_class_to_replicate = BufferedLayer
    return cache


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
