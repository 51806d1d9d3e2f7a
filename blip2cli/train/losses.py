"""BLIP-2's training objectives as plain functions of tensors.

Stage 1: image-text contrastive (ITC), image-text matching with hard negatives (ITM) and
image-grounded text generation (ITG). Stage 2: the language-modelling loss (decoder-only LLMs) and
the prefix-LM split (encoder-decoder LLMs).

Distributed semantics: features are gathered *with* gradient and token losses are normalised by the
token count of the whole global batch, so that N ranks x batch B compute exactly the loss and the
gradient of one process with batch N*B. (LAVIS gathers ITC features without gradient and averages
per-rank token means; both make results depend on the number of GPUs.)
"""

from __future__ import annotations

import hashlib
import numbers
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..runtime import dist


def itc_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, temp: torch.Tensor,
             label_smoothing: float = 0.1,
             positives: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contrastive loss of local features against the global batch.

    ``image_feats`` (B, queries, D) and ``text_feats`` (B, D) are L2-normalised. The similarity of an
    image and a text is the best query's dot product with the text [CLS] feature, divided by ``temp``.
    ``positives`` (B, B*world; default: each row's own pair, ``positive_mask``) are a row's targets, weighted
    equally, then mixed with the uniform distribution by ``label_smoothing``: with one positive per row this is
    the one-hot cross-entropy of pretraining, with several it is LAVIS's retrieval fine-tune, ``0.9 *
    pos / pos.sum(1) + 0.1 / columns``. Returns the loss and the (B, B*world) image-to-text and text-to-image
    similarity logits.
    """
    all_images = dist.gather_with_grad(image_feats)
    all_texts = dist.gather_with_grad(text_feats)
    sim_i2t = torch.einsum("iqd,td->iqt", image_feats, all_texts).max(dim=1).values / temp
    sim_t2i = torch.einsum("td,iqd->tiq", text_feats, all_images).max(dim=2).values / temp
    if positives is None:
        positives = positive_mask(image_feats.shape[0], device=image_feats.device)
    # a pair's image and text share one id, so the mask serves both directions
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    loss = (F.cross_entropy(sim_i2t.float(), targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i.float(), targets, label_smoothing=label_smoothing)) / 2
    return loss, sim_i2t, sim_t2i


def positive_mask(batch: int, image_ids: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """(B, B*world) True where a global column is a positive of a local row.

    Without ids the positive is the row's own pair; with ids (``image_id_tensor``, gathered here from every
    rank), every pair of the same image.
    """
    world = dist.world_size()
    if image_ids is None:
        mask = torch.zeros(batch, batch * world, dtype=torch.bool, device=device)
        rows = torch.arange(batch, device=device)
        mask[rows, rows + dist.rank() * batch] = True
        return mask
    all_ids = dist.gather_no_grad(image_ids)
    return image_ids[:, None] == all_ids[None, :]


def stable_image_id(image_id: str | int) -> int:
    """A signed 64-bit number for a dataset's image id (``"coco_391895"`` or ``391895``), equal in every process.

    Python's ``hash`` of a string is salted per process, so ranks would disagree; BLAKE2b is not. Integers and
    strings hash apart (``7`` is not ``"7"``); a collision among COCO's 113k images has odds below 1e-9.
    """
    key = f"int:{int(image_id)}" if isinstance(image_id, numbers.Integral) else f"str:{image_id}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


def image_id_tensor(image_ids: Sequence[str | int], device=None) -> torch.Tensor:
    """A batch's image ids as an int64 tensor (``stable_image_id`` of each), for ``positive_mask``."""
    return torch.tensor([stable_image_id(i) for i in image_ids], dtype=torch.int64, device=device)


def sample_hard_negatives(sim: torch.Tensor, positives: torch.Tensor, row_seeds: list[int]) -> torch.Tensor:
    """One negative column per row, drawn with probability softmax(sim) over the non-positives.

    Sampling is Gumbel-max with noise seeded per global row, so the choice depends on the sample and
    the step, not on how the batch is split across ranks.
    """
    with torch.no_grad():
        logits = sim.float().masked_fill(positives, float("-inf"))
        noise = torch.stack([
            -torch.empty(sim.shape[1]).exponential_(generator=torch.Generator().manual_seed(s)).log()
            for s in row_seeds
        ]).to(sim.device)
        return (logits + noise).argmax(dim=1)


def row_seeds(seed: int, step: int, batch: int, tag: int) -> list[int]:
    """Seeds of the local rows' global indices at ``step`` (``tag`` separates independent draws)."""
    start = dist.rank() * batch
    return [hash((seed, step, tag, start + i)) & 0x7FFF_FFFF_FFFF for i in range(batch)]


def itm_targets(batch: int, device=None) -> torch.Tensor:
    """Labels of the ITM batch [positives; text with a negative image; image with a negative text]."""
    return torch.cat([torch.ones(batch, dtype=torch.long, device=device),
                      torch.zeros(2 * batch, dtype=torch.long, device=device)])


def token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy summed over labelled tokens (label != -100) of this rank, divided by the
    global batch's labelled-token count per rank; averaged over ranks it is the global token mean."""
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100,
                            label_smoothing=label_smoothing, reduction="sum")
    count = dist.sum_all((labels != -100).sum().float())
    return total * dist.world_size() / count.clamp(min=1)


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts label t+1."""
    return logits[:, :-1], labels[:, 1:]


def prefix_split(text: str, rng: random.Random) -> tuple[str, str]:
    """Split a caption for Flan-T5's prefix-LM loss.

    The prefix takes the first k words, k uniform in [1, max(1, n // 2)] (the authors' recipe, LAVIS
    issue #139); the suffix, the rest, is the decoder target. One-word captions get an empty prefix.
    """
    words = text.split()
    if len(words) < 2:
        return "", text
    k = rng.randint(1, max(1, len(words) // 2))
    return " ".join(words[:k]), " ".join(words[k:])
