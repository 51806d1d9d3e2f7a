"""Frozen image encoders, built from timm (EVA ViT-g) and open_clip (CLIP ViT-L), pruned to the penultimate block.

BLIP-2 feeds the Q-Former with every token (CLS included) of the ViT's second-to-last block, without
the ViT's own final norm; ``ln_vision`` (owned by the BLIP-2 model, trainable) normalises them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """A ViT as BLIP-2 uses it: ``layers`` blocks kept (the tower's last block already removed)."""

    kind: str = "eva"  # "eva": timm Eva (EVA-CLIP ViT-g, HF Blip2VisionModel); "clip": open_clip ViT
    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    layers: int = 39
    heads: int = 16
    mlp_dim: int = 6144
    layer_norm_eps: float = 1e-6
    quick_gelu: bool = False  # OpenAI CLIP weights need QuickGELU

    def __post_init__(self) -> None:
        if self.kind not in ("eva", "clip"):
            raise ValueError(f"unknown vision tower kind {self.kind!r}: expected 'eva' or 'clip'")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


def _eva_trunk(cfg: VisionConfig) -> nn.Module:
    from functools import partial

    from timm.models.eva import Eva

    trunk = Eva(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.layers + 1,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_dim / cfg.width,
        qkv_bias=True,
        qkv_fused=True,
        num_classes=0,
        global_pool="token",
        norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
    )
    trunk.prune_intermediate_layers(indices=[cfg.layers - 1], prune_norm=True, prune_head=True)
    return trunk


def _clip_trunk(cfg: VisionConfig) -> nn.Module:
    from open_clip.transformer import QuickGELU, VisionTransformer

    act = QuickGELU if cfg.quick_gelu else nn.GELU
    trunk = VisionTransformer(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        layers=cfg.layers + 1,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_dim / cfg.width,
        act_layer=act,
        output_dim=cfg.width,
        pool_type="none",
    )
    trunk.prune_intermediate_layers(indices=[cfg.layers - 1], prune_norm=True, prune_head=True)
    return trunk


class VisionTower(nn.Module):
    """A pruned ViT returning all tokens of its last kept block, ``(B, 1 + patches, width)``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.trunk = _eva_trunk(cfg) if cfg.kind == "eva" else _clip_trunk(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.dtype)
        if self.config.kind == "eva":
            return self.trunk.forward_features(pixel_values)
        return self.trunk(pixel_values)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)


def image_transform(image_size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """BLIP-2's evaluation transform: bicubic warp to a square (no crop), to [0, 1], CLIP mean/std."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Lambda(lambda im: im.convert("RGB")),
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
