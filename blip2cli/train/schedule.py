"""Learning-rate schedule and optimiser parameter groups."""

from __future__ import annotations

import math
import re

from torch import nn


def lr_at(step: int, lr: float, min_lr: float, warmup_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr``, then cosine decay to ``min_lr`` at ``total_steps``.

    Per step, as the paper describes; LAVIS holds the rate constant within each (inner) epoch.
    """
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float, decay_temp_and_queries: bool = False,
                 vision_layer_decay: float = 1.0) -> list[dict]:
    """Trainable parameters in groups: decayed (matrices) and not (biases, norms, scalars), and, with a
    ``vision_layer_decay`` below 1, per depth of the ViT, each with its ``lr_scale`` (see ``vision_lr_scales``).

    ``decay_temp_and_queries`` reproduces LAVIS, which decays the temperature and the query tokens.
    """
    scales = vision_lr_scales(model, vision_layer_decay)
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        special = name.endswith("temp") or name.endswith("query_tokens")
        decayed = decay_temp_and_queries if special else not (p.ndim < 2 or name.endswith(".bias"))
        groups.setdefault((decayed, scales.get(name, 1.0)), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale}
            for (decayed, scale), params in groups.items()]


_VISION_BLOCK = re.compile(r"(?:^|\.)vision\.trunk\.(?:blocks|transformer\.resblocks)\.(\d+)\.")
_VISION_STEM = re.compile(r"(?:^|\.)vision\.trunk\.(?:cls_token|pos_embed|patch_embed|class_embedding|"
                          r"positional_embedding|conv1|ln_pre)\b")
_VISION = re.compile(r"(?:^|\.)vision\.trunk\.")


def vision_lr_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """Layer-wise learning-rate decay of the ViT, as BEiT and LAVIS define it: with ``depth`` blocks, block ``i``
    (from 0) learns at ``decay ** (depth - i)`` of the rate, the embeddings (patch, position, class) at
    ``decay ** (depth + 1)``, anything after the last block at the full rate. Other parameters: not listed."""
    names = [name for name, _ in model.named_parameters()]
    blocks = [int(m.group(1)) for name in names if (m := _VISION_BLOCK.search(name))]
    if decay == 1.0 or not blocks:
        return {}
    depth = max(blocks) + 1
    scales = {}
    for name in names:
        if (m := _VISION_BLOCK.search(name)):
            scales[name] = decay ** (depth - int(m.group(1)))
        elif _VISION_STEM.search(name):
            scales[name] = decay ** (depth + 1)
        elif _VISION.search(name):
            scales[name] = 1.0
    return scales
