"""Text for the Q-Former: one tokenisation for the API (ITM, ITC, features), retrieval and stage-1 training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def qformer_text(tokenizer: Any, texts: Sequence[str], max_length: int, device: torch.device | str | None = None,
                 pad_to_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask ``(B, T)`` of ``texts`` for the Q-Former's BERT tokenizer.

    Texts are cut at ``max_length`` tokens, [CLS] and [SEP] included: the checkpoint's ``qformer.max_txt_len`` (the
    length it was trained with), a training recipe's ``stage1.max_txt_len`` or a benchmark's (LAVIS's retrieval
    reads 35). Padding goes to the longest text, or with ``pad_to_max`` to ``max_length`` itself, as LAVIS pads
    in training and retrieval: one width for every batch, which ranks can gather and compare.
    """
    enc = tokenizer(list(texts), padding="max_length" if pad_to_max else True, truncation=True,
                    max_length=max_length, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))
