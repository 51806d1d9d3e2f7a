"""BLIP-2 networks: the stage-1 representation model and the image-to-text model.

Both share ``encode_image`` (frozen ViT, then ``ln_vision``) and the Q-Former; the stage-1 model adds
the ITC projections, the ITM head and the learnable temperature, the image-to-text model adds the
projection into a frozen language model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .llm import LanguageModel, build_language_model
from .qformer import MaskMode, QFormer, QFormerConfig
from .vision import VisionConfig, VisionTower


@dataclass
class Blip2Config:
    """Everything needed to build a BLIP-2 network (weights aside)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    # transformers config dict of the frozen LLM (with model_type); None for a stage-1 model.
    text: dict[str, Any] | None = None
    embed_dim: int = 256  # ITC projection width (stage 1)
    ln_vision_eps: float = 1e-6  # transformers' value; LAVIS uses 1e-5
    image_token_id: int | None = None  # the LLM's <image> placeholder, when the checkpoint has one
    # the question joins the queries in the Q-Former's self-attention (a VQA fine-tune; InstructBLIP's layout)
    qformer_text_input: bool = False

    @property
    def is_image_to_text(self) -> bool:
        return self.text is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Blip2Config:
        d = dict(d)
        return cls(vision=VisionConfig(**d.pop("vision")), qformer=QFormerConfig(**d.pop("qformer")), **d)


class Blip2Base(nn.Module):
    """What both networks share: the frozen tower, its LayerNorm, the query tokens and the Q-Former."""

    def __init__(self, cfg: Blip2Config) -> None:
        super().__init__()
        self.config = cfg
        self.vision = VisionTower(cfg.vision)
        self.ln_vision = nn.LayerNorm(cfg.vision.width, eps=cfg.ln_vision_eps)
        self.qformer = QFormer(cfg.qformer)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised ViT tokens ``(B, N, width)`` in the Q-Former's dtype (float32 by default)."""
        tokens = self.vision(pixel_values)
        return self.ln_vision(tokens.to(self.ln_vision.weight.dtype))

    def query_output(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The learned queries after cross-attending to the image, ``(B, queries, hidden)``."""
        return self.qformer(image=image_embeds).query_states

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vision]

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters read outside their own module's forward (ZeRO-3 gathers them with the caller's)."""
        return [*self.vision.trunk.parameters(recurse=False), self.qformer.query_tokens]


class Blip2Stage1(Blip2Base):
    """Q-Former with ITC, ITM and ITG heads (stage-1 pretraining, retrieval, Q-Former captioning)."""

    def __init__(self, cfg: Blip2Config) -> None:
        super().__init__(cfg)
        d = cfg.qformer.hidden_size
        self.vision_proj = nn.Linear(d, cfg.embed_dim)
        self.text_proj = nn.Linear(d, cfg.embed_dim)
        self.itm_head = nn.Linear(d, 2)
        # shape [1], not [] (LAVIS): DeepSpeed cannot broadcast 0-dim parameters
        self.temp = nn.Parameter(torch.tensor([0.07]))

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC features of the queries, ``(B, queries, embed_dim)``."""
        q = self.query_output(image_embeds)
        return F.normalize(self.vision_proj(q.to(self.vision_proj.weight.dtype)), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC features of the text [CLS] token, ``(B, embed_dim)``."""
        out = self.qformer(input_ids=input_ids, text_mask=attention_mask, use_queries=False)
        return F.normalize(self.text_proj(out.hidden_states[:, 0].to(self.text_proj.weight.dtype)), dim=-1)

    def external_parameters(self) -> list[nn.Parameter]:
        return [*super().external_parameters(), self.temp]

    @staticmethod
    def similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """ITC similarity ``(images, texts)``: the best query's cosine with each text (no temperature)."""
        return torch.einsum("iqd,td->iqt", image_feats, text_feats).max(dim=1).values

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """Paired ITM logits ``(B, 2)``: the ITM head on each query row of the joint pass, averaged."""
        out = self.qformer(image=image_embeds, input_ids=input_ids, text_mask=attention_mask,
                           mode=MaskMode.BIDIRECTIONAL)
        return self.itm_head(out.query_states.to(self.itm_head.weight.dtype)).mean(dim=1)


class Blip2ImageToText(Blip2Base):
    """ViT, Q-Former (query path) and a projection into a frozen LLM."""

    def __init__(self, cfg: Blip2Config, language_model: nn.Module | None = None) -> None:
        super().__init__(cfg)
        if cfg.text is None:
            raise ValueError("an image-to-text model needs a language-model config")
        if cfg.qformer_text_input and not cfg.qformer.has_text:
            raise ValueError("a Q-Former that reads the question needs its text side (qformer.has_text)")
        lm = language_model if language_model is not None else build_language_model(cfg.text)
        self.language_model = LanguageModel(lm)
        self.language_projection = nn.Linear(cfg.qformer.hidden_size, self.language_model.hidden_size)

    def soft_prompts(self, pixel_values: torch.Tensor, question_ids: torch.Tensor | None = None,
                     question_mask: torch.Tensor | None = None,
                     image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Projected query outputs ``(B, queries, llm width)``: the visual prompt of the LLM.

        ``image_index``: the image of each prompt, when images are shared by several prompts (each image goes
        through the ViT once, and through a question-blind Q-Former once). ``question_ids``/``question_mask``:
        one question per prompt in the Q-Former's tokens, for a Q-Former that reads it (``qformer_text_input``);
        its tokens join the queries in a bi-directional self-attention, so the queries pick what it asks about.
        """
        image = self.encode_image(pixel_values)
        if question_ids is None:
            if self.config.qformer_text_input:
                raise ValueError("this model's Q-Former reads the question: pass question_ids")
            q = self.query_output(image)
            if image_index is not None:
                q = q[image_index]
        else:
            if not self.config.qformer_text_input:
                raise ValueError("this model's Q-Former does not read a question")
            if image_index is not None:
                image = image[image_index]
            q = self.qformer(image=image, input_ids=question_ids, text_mask=question_mask,
                             mode=MaskMode.BIDIRECTIONAL).query_states
        proj = self.language_projection
        return proj(q.to(proj.weight.dtype))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                question_ids: torch.Tensor | None = None, question_mask: torch.Tensor | None = None, **kwargs: Any):
        soft_prompts = self.soft_prompts(pixel_values, question_ids, question_mask)
        return self.language_model(soft_prompts, input_ids, attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 image_index: torch.Tensor | None = None, question_ids: torch.Tensor | None = None,
                 question_mask: torch.Tensor | None = None, **decoding: Any) -> torch.Tensor:
        """New token ids for each prompt (see ``LanguageModel.generate``); see ``soft_prompts`` for the others."""
        soft_prompts = self.soft_prompts(pixel_values, question_ids, question_mask, image_index)
        return self.language_model.generate(soft_prompts, input_ids, attention_mask,
                                            placeholder_id=self.config.image_token_id, **decoding)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vision, self.language_model]
