"""Learning-rate schedule and optimiser parameter groups."""

from __future__ import annotations

import math

from torch import nn


def lr_at(step: int, lr: float, min_lr: float, warmup_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr``, then cosine decay to ``min_lr`` at ``total_steps``.

    Per step, as the paper describes; LAVIS holds the rate constant within each (inner) epoch.
    """
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float, decay_temp_and_queries: bool = False) -> list[dict]:
    """Trainable parameters in two groups: decayed (matrices) and not (biases, norms, scalars).

    ``decay_temp_and_queries`` reproduces LAVIS, which decays the temperature and the query tokens.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        special = name.endswith("temp") or name.endswith("query_tokens")
        if special:
            (decay if decay_temp_and_queries else no_decay).append(p)
        elif p.ndim < 2 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
