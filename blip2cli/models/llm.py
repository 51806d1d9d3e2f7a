"""Frozen language models from transformers, conditioned on projected query outputs (soft visual prompts).

Decoder-only models (OPT or any ``AutoModelForCausalLM``) read ``[soft prompts][pads][BOS][prompt]``;
encoder-decoder models (Flan-T5) read ``[soft prompts][prompt][</s>]`` in the encoder and generate in
the decoder. That is the layout of LAVIS and of transformers' ``Blip2ForConditionalGeneration``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .kv_cache import buffered_cache, decoder_cache_kwarg, reorder_after
from .sampling import NucleusSampler
from .search import Search, decode


def build_language_model(text_config: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None,
                         dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers LM from its config dict; weights from ``state_dict`` (tied weights re-tied).

    Without a state dict the model is randomly initialised (tests, tiny recipes).
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

    cfg = dict(text_config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    mapping = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING if config.is_encoder_decoder else MODEL_FOR_CAUSAL_LM_MAPPING
    model_class = mapping[type(config)]
    if state_dict is None:
        model = model_class._from_config(config, dtype=dtype)
    else:
        model = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype,
                                            trust_remote_code=False)
    return model.eval()


class LanguageModel(nn.Module):
    """A transformers LM behind the soft-prompt interface BLIP-2 needs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.model.config.is_encoder_decoder)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def assemble(
        self, soft_prompts: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[soft prompts; embedded tokens]`` and the matching attention mask."""
        embeds = self.model.get_input_embeddings()(input_ids)
        embeds = torch.cat([soft_prompts.to(embeds.dtype), embeds], dim=1)
        ones = attention_mask.new_ones(soft_prompts.shape[:2])
        return embeds, torch.cat([ones, attention_mask], dim=1)

    def forward(
        self,
        soft_prompts: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        """Logits (and loss, with ``labels``) of the LM on the assembled input."""
        embeds, mask = self.assemble(soft_prompts, input_ids, attention_mask)
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "attention_mask": mask}
        if self.is_encoder_decoder:
            kwargs.update(decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                          labels=labels)
        elif labels is not None:
            ignore = labels.new_full(soft_prompts.shape[:2], -100)
            kwargs["labels"] = torch.cat([ignore, labels], dim=1)
        return self.model(**kwargs)

    @torch.no_grad()
    def generate(
        self,
        soft_prompts: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        placeholder_id: int | None = None,
        *,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        min_new_tokens: int | None = None,
        length_penalty: float | None = None,
        repetition_penalty: float | None = None,
        early_stopping: bool | str | None = None,
        do_sample: bool = False,
        top_p: float | None = None,
        top_k: int | None = None,
        row_seeds: torch.Tensor | None = None,
        beam_scoring: str | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Newly generated token ids, ``(B * num_return_sequences, T)``, image-major; the prompt is not echoed.

        The settings are ``generate``'s, with its defaults; ``beam_scoring`` picks how beams are ranked (see
        ``models.search``) and ``row_seeds`` (one per text) seed sampling, which draws with
        :class:`NucleusSampler` (``top_k`` 50 unless set, as ``generate``). The prompt runs once per image and
        its cache is shared by the image's beams or samples. ``placeholder_id`` (a checkpoint's ``<image>`` token)
        stands in the ids of the soft-prompt positions, as in transformers, so that the repetition penalty sees
        the same sequence there.
        """
        config = self.model.generation_config
        eos = config.eos_token_id
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        pad = pad_token_id if pad_token_id is not None else config.pad_token_id
        pad = pad if pad is not None else (eos[0] if eos else 0)
        embeds, mask = self.assemble(soft_prompts, input_ids, attention_mask)
        images = embeds.shape[0]
        max_steps = 20 if max_new_tokens is None else max_new_tokens
        if self.is_encoder_decoder:
            start = torch.full((images, 1), config.decoder_start_token_id, dtype=torch.long, device=embeds.device)
            stepper = EncoderDecoderSteps(self.model, embeds, mask, start, capacity=1 + max_steps)
            history, prefix = start, torch.ones(images, dtype=torch.long, device=embeds.device)
        else:
            stepper = DecoderOnlySteps(self.model, embeds, mask, capacity=embeds.shape[1] + max_steps)
            history, prefix = input_ids, attention_mask.sum(dim=1)
            if placeholder_id is not None:
                history = torch.cat([input_ids.new_full(soft_prompts.shape[:2], placeholder_id), input_ids], dim=1)
        sampler = None
        if do_sample:
            if row_seeds is None:
                row_seeds = torch.randint(0, 2**31, (images * num_return_sequences,))
            sampler = NucleusSampler(1.0 if top_p is None else top_p, row_seeds, 50 if top_k is None else top_k)
        search = Search(
            max_new_tokens=max_steps, eos=eos, pad=pad, num_beams=num_beams,
            num_return_sequences=num_return_sequences, min_new_tokens=min_new_tokens or 0,
            length_penalty=1.0 if length_penalty is None else length_penalty,
            early_stopping=False if early_stopping is None else early_stopping,
            repetition_penalty=repetition_penalty, scoring=beam_scoring or "transformers", prefix_lengths=prefix,
            sampler=sampler)
        return decode(stepper, stepper.first_logits, search, history=history)


def _forward_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """The cache (under the name the model takes it) and ``logits_to_keep=1`` where the model has it, as
    ``generate`` passes them."""
    kwargs: dict[str, Any] = {decoder_cache_kwarg(model): cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


class DecoderOnlySteps:
    """A decoder-only LLM mid-decode (a ``search.Stepper``): ``[soft prompts][pads][BOS][prompt]`` run once per
    image, then one token at a time, the attention mask growing with the rows. The cache is written into buffers of
    ``capacity`` positions (no copy per step), and the beams of an image, which share the prompt, reorder only the
    positions after it."""

    def __init__(self, model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, capacity: int) -> None:
        self.model, self.mask, self.cache = model, mask, buffered_cache(capacity)
        self.kwargs = _forward_kwargs(model, self.cache)
        self.first_logits = model(inputs_embeds=embeds, attention_mask=mask, **self.kwargs).logits[:, -1]
        self.prompt_length = embeds.shape[1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(tokens.shape[0], 1)], dim=1)
        return self.model(input_ids=tokens[:, None], attention_mask=self.mask, **self.kwargs).logits[:, -1]

    def reorder(self, rows: torch.Tensor, images: torch.Tensor | None = None) -> None:
        if images is None:  # within an image: the prompt's keys, values and mask are the same in every row
            reorder_after(self.cache, rows, self.prompt_length)
        else:
            self.cache.reorder_cache(rows)
            self.mask = self.mask[rows]


class EncoderDecoderSteps:
    """An encoder-decoder LLM mid-decode (a ``search.Stepper``): the encoder and the decoder's first step run once
    per image; the rows of an image then share its encoder states. The beams of an image have the same
    cross-attention keys and values, so those move only when the images do."""

    def __init__(self, model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, start: torch.Tensor,
                 capacity: int) -> None:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        self.model, self.mask = model, mask
        self.encoded = BaseModelOutput(last_hidden_state=model.get_encoder()(inputs_embeds=embeds,
                                                                             attention_mask=mask).last_hidden_state)
        self.cache = EncoderDecoderCache(buffered_cache(capacity), DynamicCache())
        self.kwargs = _forward_kwargs(model, self.cache)
        self.first_logits = self.step(start[:, 0])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(encoder_outputs=self.encoded, attention_mask=self.mask, decoder_input_ids=tokens[:, None],
                          **self.kwargs).logits[:, -1]

    def reorder(self, rows: torch.Tensor, images: torch.Tensor | None = None) -> None:
        if images is None:  # within an image: the same decoder start, encoder states and cross-attention
            reorder_after(self.cache.self_attention_cache, rows, 1)
        else:
            self.cache.self_attention_cache.reorder_cache(rows)
            self.cache.cross_attention_cache.reorder_cache(rows)
            self.encoded = type(self.encoded)(last_hidden_state=self.encoded.last_hidden_state[rows])
            self.mask = self.mask[rows]
