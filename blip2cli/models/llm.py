"""Frozen language models from transformers, conditioned on projected query outputs (soft visual prompts).

Decoder-only models (OPT or any ``AutoModelForCausalLM``) read ``[soft prompts][pads][BOS][prompt]``;
encoder-decoder models (Flan-T5) read ``[soft prompts][prompt][</s>]`` in the encoder and generate in
the decoder. That is the layout of LAVIS and of transformers' ``Blip2ForConditionalGeneration``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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
        **decoding: Any,
    ) -> torch.Tensor:
        """Newly generated token ids, ``(B * num_return_sequences, T)``; the prompt is not echoed.

        ``placeholder_id`` (a checkpoint's ``<image>`` token) stands in the ids of the soft-prompt
        positions, as in transformers, so that id-based logits processors (repetition penalty) see
        the same sequence there.
        """
        embeds, mask = self.assemble(soft_prompts, input_ids, attention_mask)
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "attention_mask": mask, **decoding}
        if self.is_encoder_decoder or placeholder_id is None:
            return self.model.generate(**kwargs)
        ids = torch.cat([input_ids.new_full(soft_prompts.shape[:2], placeholder_id), input_ids], dim=1)
        return self.model.generate(input_ids=ids, **kwargs)[:, ids.shape[1]:]
