"""Training tasks: a BLIP-2 network plus its objectives; ``forward(batch, step)`` returns the losses.

The engine wraps a task module (DeepSpeed or a plain process); stages differ here, not in the loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.blip2 import Blip2ImageToText, Blip2Stage1
from ..models.qformer import MaskMode
from ..models.qformer_text import qformer_text
from ..runtime import dist
from ..runtime.errors import Blip2Error
from . import losses


@dataclass
class Stage1Loss:
    """Stage-1 objective settings (LAVIS blip2_qformer defaults)."""

    max_txt_len: int  # text tokens, [CLS] and [SEP] included (the trained checkpoint keeps it: qformer.max_txt_len)
    label_smoothing: float = 0.1  # ITC and ITG; ITM has none
    temp_min: float | None = None  # LAVIS's BLIP-2 never clamps the temperature; BLIP clamped to [0.001, 0.5]
    temp_max: float | None = None
    seed: int = 0  # hard-negative sampling
    # Every caption of the same image (the batch's image_id) is an ITC positive and never an ITM negative, across
    # ranks: retrieval fine-tuning on COCO, five captions per image, as LAVIS's. Unset: each pair is its own only
    # positive, the paper's pretraining (its web images carry no shared id, and LAVIS's stage 1 at HEAD uses ids
    # by accident, for COCO samples only).
    same_image_positives: bool | None = None


@dataclass
class Stage2Loss:
    """Stage-2 objective settings (LAVIS blip2_opt / blip2_t5)."""

    max_txt_len: int | None = None  # LLM tokens per caption, its prompt included (unset: captions are not cut)
    prompt: str = ""  # prepended to every caption and never a target (its BOS included)
    seed: int = 0  # prefix-LM split points
    # encoder-decoder LLMs: the prompt alone in the encoder and the whole caption the decoder's target, as the
    # authors fine-tune Flan-T5 on COCO (unset: stage 2's prefix LM, each caption split at a random word)
    whole_caption: bool | None = None


class Stage1Task(nn.Module):
    """ITC + ITM + ITG on a ``Blip2Stage1`` network; the total is their unweighted sum (paper, LAVIS)."""

    def __init__(self, net: Blip2Stage1, tokenizer: Any, settings: Stage1Loss) -> None:
        super().__init__()
        self.net = net
        self.tokenizer = tokenizer
        self.settings = settings
        self.dec_id = tokenizer.bos_token_id  # [DEC]
        if self.dec_id is None:
            raise ValueError("the Q-Former tokenizer needs [DEC] as its BOS token")

    def tokenize(self, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded to ``max_txt_len`` itself: every rank's batch has one width, so ranks can gather the ids."""
        return qformer_text(self.tokenizer, texts, self.settings.max_txt_len, device, pad_to_max=True)

    def temperature(self) -> torch.Tensor:
        s = self.settings
        if s.temp_min is None and s.temp_max is None:
            return self.net.temp
        return self.net.temp.clamp(min=s.temp_min, max=s.temp_max)

    def image_ids(self, batch: dict[str, Any], device) -> torch.Tensor | None:
        """The batch's image ids as int64 (``losses.image_id_tensor``) when the settings pair captions by image."""
        if not self.settings.same_image_positives:
            return None
        if "image_id" not in batch:
            raise Blip2Error("stage1.same_image_positives: the batch has no image_id (every data source must give "
                             "one, as caption_json does)")
        return losses.image_id_tensor(batch["image_id"], device)

    def forward(self, batch: dict[str, Any], step: int = 0) -> dict[str, torch.Tensor]:
        net, s = self.net, self.settings
        pixels = batch["image"]
        ids, mask = self.tokenize(batch["text"], pixels.device)
        b = ids.shape[0]

        image_embeds = net.encode_image(pixels)
        query = net.qformer(image=image_embeds, use_cache=True)
        image_feats = torch.nn.functional.normalize(net.vision_proj(query.query_states), dim=-1)
        text_feats = net.text_features(ids, mask)
        positives = losses.positive_mask(b, self.image_ids(batch, pixels.device), pixels.device)
        loss_itc, sim_i2t, sim_t2i = losses.itc_loss(image_feats, text_feats, self.temperature(), s.label_smoothing,
                                                      positives)

        ids_world, mask_world = dist.gather_no_grad(ids), dist.gather_no_grad(mask)
        positives = positives | (ids[:, None, :] == ids_world[None, :, :]).all(dim=-1)  # nor a same-caption pair
        neg_image = losses.sample_hard_negatives(sim_t2i, positives, losses.row_seeds(s.seed, step, b, 0))
        neg_text = losses.sample_hard_negatives(sim_i2t, positives, losses.row_seeds(s.seed, step, b, 1))
        images_world = dist.gather_with_grad(image_embeds)
        itm_images = torch.cat([image_embeds, images_world[neg_image], image_embeds])
        itm_ids = torch.cat([ids, ids, ids_world[neg_text]])
        itm_mask = torch.cat([mask, mask, mask_world[neg_text]])
        itm_logits = net.itm_logits(itm_images, itm_ids, itm_mask)
        loss_itm = torch.nn.functional.cross_entropy(itm_logits, losses.itm_targets(b, pixels.device))

        dec_ids = ids.clone()
        dec_ids[:, 0] = self.dec_id
        labels = dec_ids.masked_fill(mask == 0, -100)
        text = net.qformer(input_ids=dec_ids, text_mask=mask, past=query.cache, mode=MaskMode.CAUSAL,
                           use_queries=False)
        logits, targets = losses.shift_for_next_token(net.qformer.text_logits(text.text_states), labels)
        loss_itg = losses.token_loss(logits, targets, s.label_smoothing)

        total = loss_itc + loss_itm + loss_itg
        return {"loss": total, "itc": loss_itc.detach(), "itm": loss_itm.detach(), "itg": loss_itg.detach(),
                "tokens": mask.sum()}


class Stage2Task(nn.Module):
    """Image-to-text language modelling through a frozen LLM.

    Decoder-only: ``[soft prompts][BOS][prompt][caption]\\n`` with only the caption and its newline as
    targets. Encoder-decoder: the caption split into a prefix (encoder, after the soft prompts) and a
    suffix (decoder target), the prefix-LM loss of the paper; or, with ``whole_caption``, the prompt in the
    encoder and the whole caption the target (caption fine-tuning).
    """

    def __init__(self, net: Blip2ImageToText, tokenizer: Any, settings: Stage2Loss) -> None:
        super().__init__()
        self.net = net
        self.tokenizer = tokenizer
        self.settings = settings

    def _encode(self, texts: list[str], device, add_special_tokens: bool = True):
        max_len = self.settings.max_txt_len
        enc = self.tokenizer(texts, padding="longest", truncation=max_len is not None, max_length=max_len,
                             return_tensors="pt", add_special_tokens=add_special_tokens)
        return enc.input_ids.to(device), enc.attention_mask.to(device)

    def decoder_only_inputs(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids, mask and labels: prompt (with BOS) and padding are never targets."""
        prompt = self.settings.prompt
        self.tokenizer.padding_side = "right"
        ids, mask = self._encode([prompt + c + "\n" for c in captions], device)
        labels = ids.masked_fill(mask == 0, -100)
        # The prompt's tokens, BOS included, without a trailing space: byte-level BPE merges that space into
        # the caption's first word, and LAVIS, counting it, masks that word ("a photo of " + caption).
        prompt_len = len(self.tokenizer(prompt.rstrip()).input_ids) if prompt.strip() else 1
        labels[:, :prompt_len] = -100
        return ids, mask, labels

    def prefix_lm_inputs(self, captions: list[str], step: int, device):
        """Encoder ids/mask from the prefixes and decoder labels from the suffixes."""
        s = self.settings
        if s.whole_caption:
            splits = [("", c) for c in captions]
        else:
            splits = [losses.prefix_split(c, random.Random(f"{s.seed}-{step}-{c}")) for c in captions]
        self.tokenizer.padding_side = "right"
        enc_ids, enc_mask = self._encode([s.prompt + p if s.prompt else p for p, _ in splits], device)
        dec_ids, dec_mask = self._encode([x for _, x in splits], device)
        return enc_ids, enc_mask, dec_ids.masked_fill(dec_mask == 0, -100), dec_mask

    def forward(self, batch: dict[str, Any], step: int = 0) -> dict[str, torch.Tensor]:
        pixels = batch["image"]
        lm = self.net.language_model
        soft = self.net.soft_prompts(pixels)
        if lm.is_encoder_decoder:
            ids, mask, labels, dec_mask = self.prefix_lm_inputs(batch["text"], step, pixels.device)
            logits = lm(soft, ids, mask, labels=labels, decoder_attention_mask=dec_mask).logits
            tokens = mask.sum() + dec_mask.sum()
        else:
            ids, mask, labels = self.decoder_only_inputs(batch["text"], pixels.device)
            logits = lm(soft, ids, mask).logits[:, soft.shape[1]:]
            logits, labels = losses.shift_for_next_token(logits, labels)
            tokens = mask.sum()
        loss = losses.token_loss(logits, labels)
        return {"loss": loss, "lm": loss.detach(), "tokens": tokens}
