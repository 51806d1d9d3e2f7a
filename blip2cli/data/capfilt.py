"""CapFilt as BLIP-2 used it: a BLIP captioner samples captions for each web image, CLIP ranks them
together with the web caption by image-text cosine similarity, and the top ones are kept with their scores.

Sampling is nucleus sampling by inverting the nucleus's cumulative distribution at a uniform number hashed
from (seed, sample key, caption index, step), so the captions of an image do not depend on the batch it is
in or on the number of processes. Output shards carry every input member unchanged, with the kept captions
added to the json as ``"captions": [{"text", "score", "source"}]``; the pretraining loader draws one of
them per visit.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from ..errors import Blip2Error
from ..io import atomic_path, atomic_write_text
from .datasets import decode_image, expand_shards, sample_meta, web_caption

_MASK32 = 0xFFFFFFFF


@dataclass
class CapFiltRecipe:
    """Models and decoding of ``blip2 prepare capfilt`` (``recipes/prepare/capfilt.yaml``)."""

    captioner: str = "blip-large-captioner"
    ranker: str = "clip-vit-l-14"
    prompt: str = "a picture of "
    num_captions: int = 10
    top_p: float = 0.9
    top_k: int = 50  # 0: none
    max_length: int = 30  # tokens, the prompt included (BLIP counts this way)
    min_length: int = 10
    repetition_penalty: float = 1.0
    keep: int = 2
    batch_size: int = 32
    workers: int = 4  # image-decoding processes per rank
    seed: int = 0


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


# --- models -------------------------------------------------------------------------------------------


class Captioner:
    """A transformers BLIP captioning model (``BlipForConditionalGeneration``) and its processor."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from ..models.hub import local_dir_for

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
    def sample(self, pixel_values: torch.Tensor, row_seeds: torch.Tensor, recipe: CapFiltRecipe) -> list[str]:
        """``num_captions`` sampled captions per image, image-major, without the prompt."""
        embeds = self.model.vision_model(pixel_values=pixel_values.to(self.device, self.dtype))[0]
        tokens = self._decode(embeds, self._prompt_ids(recipe.prompt), row_seeds.to(self.device), recipe)
        texts = self.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [strip_prompt(t, recipe.prompt) for t in texts]

    def _decode(self, embeds: torch.Tensor, prompt: torch.Tensor, row_seeds: torch.Tensor,
                recipe: CapFiltRecipe) -> torch.Tensor:
        """Token ids ``[images * n, <= max_length]``, as transformers' ``generate`` with the recipe's repetition
        penalty and minimum length followed by :class:`NucleusSampler` would give them (a finished caption is
        padded), except that an image leaves the batch once all of its captions have ended."""
        from transformers import LogitsProcessorList, MinLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

        config = self.model.config.text_config
        eos, pad = config.sep_token_id, config.pad_token_id
        images, n = embeds.shape[0], recipe.num_captions
        processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(recipe.repetition_penalty),
                                          MinLengthLogitsProcessor(recipe.min_length, eos, device=self.device)])
        sampler = NucleusSampler(recipe.top_p, row_seeds, recipe.top_k)
        decoder = self.model.text_decoder
        tokens = prompt.repeat(images * n, 1)
        ended = torch.zeros(images * n, dtype=torch.bool, device=self.device)
        live = torch.arange(images * n, device=self.device)  # the rows still in the batch, image-major
        cache_kwarg = decoder_cache_kwarg(decoder)
        with shared_image_cross_attention(decoder, embeds) as attention:
            cache = self._prefill(prompt, embeds, n, recipe.max_length)
            while tokens.shape[1] < recipe.max_length:
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


class Ranker:
    """An open_clip CLIP model: cosine similarity between an image and each of its candidate captions."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype):
        import open_clip

        ident, pretrained = _open_clip_source(name)
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(ident, pretrained=pretrained)
            self.tokenizer = open_clip.get_tokenizer(ident)
        except (RuntimeError, FileNotFoundError, ValueError) as e:
            raise Blip2Error(f"ranker {name}: {str(e).splitlines()[0]}") from None
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def scores(self, pixel_values: torch.Tensor, candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        """For image ``i``, the cosine similarity of each text in ``candidates[i]``."""
        image = self.model.encode_image(pixel_values.to(self.device, self.dtype)).float()
        image = torch.nn.functional.normalize(image, dim=-1)
        flat = [t for texts in candidates for t in texts]
        text = self._encode_text(self.tokenizer(flat).to(self.device)).float()
        text = torch.nn.functional.normalize(text, dim=-1)
        out, start = [], 0
        for i, texts in enumerate(candidates):
            out.append((text[start:start + len(texts)] @ image[i]).tolist())
            start += len(texts)
        return out


    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's ``encode_text``, run only up to the longest text's end token when the text tower is
        causal and pools at that token (OpenAI CLIP): later positions cannot change the pooled feature,
        and captions fill a fraction of the 77-token context."""
        import open_clip
        from open_clip.transformer import text_global_pool

        model = self.model
        if not (type(model) is open_clip.CLIP and model.attn_mask is not None and model.text_pool_type == "argmax"):
            return model.encode_text(tokens)
        length = int(tokens.argmax(dim=-1).max()) + 1
        tokens = tokens[:, :length]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        x = text_global_pool(x, tokens, "argmax")
        if model.text_projection is None:
            return x
        return model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) \
            else x @ model.text_projection


def _read_config(path: Path, name: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise Blip2Error(f"{name}: no readable config.json in {path.parent}") from None


OPEN_CLIP_FILES = ["open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]


def _open_clip_source(name: str) -> tuple[str, str | None]:
    """(model name for open_clip, pretrained tag) for a local directory, a registry name, a hub id, or
    an open_clip ``MODEL/TAG`` pair such as ``ViT-L-14/openai``."""
    from ..models import registry
    from ..models.hub import _HUB_ID, hub_snapshot

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise Blip2Error(f"{path}: no open_clip_config.json; not an open_clip model directory")
        return f"local-dir:{path}", None
    entry = registry.lookup(name)
    if entry is not None:
        if entry.kind != "ranker":
            raise Blip2Error(f"{name} is not a CLIP ranker; `blip2 models` lists the rankers")
        name = entry.where
    if name.startswith("hf-hub:"):
        name = name[len("hf-hub:"):]
    import open_clip

    model, _, tag = name.partition("/")
    if tag and model in open_clip.list_models():
        return model, tag
    if _HUB_ID.match(name):
        return f"local-dir:{hub_snapshot(name, patterns=OPEN_CLIP_FILES)}", None
    raise registry.unknown_name(name, kind="ranker")


# --- shards -------------------------------------------------------------------------------------------


def read_samples(path: Path) -> Iterator[dict[str, Any]]:
    """The samples of a webdataset tar in order: ``{"__key__": key, ext: bytes, ...}``."""
    for sample in wds.tariterators.tarfile_samples([{"url": str(path)}]):
        yield {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


def write_samples(path: Path, samples: Sequence[dict[str, Any]]) -> None:
    """A webdataset tar of ``samples``, written atomically (members sorted per sample as given)."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def top_captions(web: str, synthetic: Sequence[str], scores: Sequence[float], keep: int) -> list[dict[str, Any]]:
    """The ``keep`` best distinct texts among the web caption (first) and the synthetic ones, by score;
    ties keep the earlier candidate."""
    candidates = ([(web, "web")] if web else []) + [(t, "synthetic") for t in synthetic]
    best: dict[str, tuple[float, int, str]] = {}
    for order, ((text, source), score) in enumerate(zip(candidates, scores)):
        if text and text not in best:
            best[text] = (score, order, source)
    ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[1][1]))[:keep]
    return [{"text": text, "score": round(score, 6), "source": source} for text, (score, _, source) in ranked]


class _ShardImages(torch.utils.data.Dataset):
    """Decoded model inputs of one shard's samples; an undecodable image gives ``None``."""

    def __init__(self, samples: list[dict[str, Any]], blip_preprocess, clip_preprocess):
        # only the preprocessors: DataLoader workers must not carry the models
        self.samples, self.blip_preprocess, self.clip_preprocess = samples, blip_preprocess, clip_preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        image = decode_image(self.samples[i])
        if image is None:
            return i, None
        blip = blip_pixels(self.blip_preprocess, image)
        return i, (blip, self.clip_preprocess(image))


def _collate(batch):
    return batch


class UnreadableShard(Blip2Error):
    """An input shard that is not a readable tar file."""


def process_shard(source: Path, target: Path, captioner: Captioner, ranker: Ranker,
                  recipe: CapFiltRecipe) -> dict[str, Any]:
    """Caption and rank every image of ``source``; write ``target`` (and its stats beside it) atomically."""
    start = time.perf_counter()
    try:
        samples = list(read_samples(source))
    except (tarfile.TarError, OSError) as e:
        raise UnreadableShard(f"{source}: not a readable tar shard ({str(e).splitlines()[0]})") from None
    images = _ShardImages(samples, captioner.processor.image_processor, ranker.preprocess)
    loader = torch.utils.data.DataLoader(images, batch_size=recipe.batch_size, num_workers=recipe.workers,
                                         collate_fn=_collate)
    kept: dict[int, list[dict[str, Any]]] = {}
    for batch in loader:
        good = [(i, views) for i, views in batch if views is not None]
        if not good:
            continue
        blip = torch.stack([views[0] for _, views in good])
        clip = torch.stack([views[1] for _, views in good])
        keys = [samples[i]["__key__"] for i, _ in good]
        seeds = torch.tensor([row_seed(recipe.seed, key, j) for key in keys for j in range(recipe.num_captions)])
        synthetic = captioner.sample(blip, seeds, recipe)
        webs = [" ".join(web_caption(samples[i]).split()) for i, _ in good]
        per_image = [synthetic[k * recipe.num_captions:(k + 1) * recipe.num_captions] for k in range(len(good))]
        candidates = [([web] if web else []) + texts for web, texts in zip(webs, per_image)]
        scores = ranker.scores(clip, candidates)
        for (i, _), web, texts, sc in zip(good, webs, per_image, scores):
            kept[i] = top_captions(web, texts, sc, recipe.keep)
    out = []
    for i, sample in enumerate(samples):
        if i not in kept:
            continue
        meta = _json(sample)
        meta["captions"] = kept[i]
        out.append({**sample, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
    write_samples(target, out)
    web_kept = sum(any(c["source"] == "web" for c in kept[i]) for i in kept)
    stats = {"shard": source.name, "samples": len(samples), "captioned": len(out),
             "unreadable": len(samples) - len(out), "web_caption_kept": web_kept,
             "seconds": round(time.perf_counter() - start, 3)}
    atomic_write_text(stats_path(target), json.dumps(stats))
    return stats


def _json(sample: dict[str, Any]) -> dict[str, Any]:
    meta = sample_meta(sample)
    return meta if isinstance(meta, dict) else {"original": meta}


def stats_path(target: Path) -> Path:
    """A finished shard's stats file; it is written last, so its presence marks the shard done."""
    return target.with_name(target.name.removesuffix(".tar") + "_capfilt.json")


def list_shards(inputs: Sequence[str]) -> list[Path]:
    """Input shards: ``.tar`` files, directories of them, globs or brace patterns (``{00000..00099}``)."""
    shards = expand_shards(list(inputs))
    remote = next((s for s in shards if "://" in s or s.startswith("pipe:")), None)
    if remote is not None:
        raise Blip2Error(f"{remote}: capfilt reads local shards; copy them here first")
    names = [Path(s).name for s in shards]
    if len(set(names)) != len(names):
        raise Blip2Error("two input shards have the same file name; give shards from one directory at a time")
    return [Path(s) for s in shards]


def run_capfilt(shards: Sequence[Path], out: Path, recipe: CapFiltRecipe, device: torch.device,
                dtype: torch.dtype, rank: int = 0, world: int = 1, on_shard=None) -> list[dict[str, Any]]:
    """Process this rank's shards (every ``world``-th); finished ones are skipped. Returns their stats; a
    shard that cannot be read gives ``{"shard", "error"}`` instead, and the others go on (a rerun retries it)."""
    mine = [s for i, s in enumerate(shards) if i % world == rank]
    todo = [s for s in mine if not stats_path(out / s.name).exists()]
    results = [json.loads(stats_path(out / s.name).read_text()) for s in mine if s not in todo]
    if not todo:
        return results
    captioner = Captioner(recipe.captioner, device, dtype)
    ranker = Ranker(recipe.ranker, device, dtype)
    for shard in todo:
        try:
            stats = process_shard(shard, out / shard.name, captioner, ranker, recipe)
        except UnreadableShard as e:
            stats = {"shard": shard.name, "error": str(e)}
        results.append(stats)
        if on_shard is not None:
            on_shard(stats)
    return results


def summarize(out: Path) -> dict[str, Any]:
    """Totals over every finished shard in ``out``."""
    totals = {"shards": 0, "samples": 0, "captioned": 0, "unreadable": 0, "web_caption_kept": 0, "seconds": 0.0}
    for path in sorted(out.glob("*_capfilt.json")):
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        totals["shards"] += 1
        for key in ("samples", "captioned", "unreadable", "web_caption_kept", "seconds"):
            totals[key] += stats.get(key, 0)
    seconds = totals["seconds"]
    totals["images_per_second"] = round(totals["captioned"] / seconds, 3) if seconds else None
    totals["seconds"] = round(seconds, 3)
    return {"out": str(out), **totals}
