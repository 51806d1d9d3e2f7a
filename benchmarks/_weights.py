"""Random weights for the benchmarks' models."""

from __future__ import annotations

import torch


def randomise(model: torch.nn.Module) -> None:
    """N(0, 0.02) matrices and N(0, 0.01) vectors, unit LayerNorm scales: transformers' init leaves many
    zeros, and random weights give real searches."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.normal_(0, 0.01)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1.0)
