"""The pretrained parts a BLIP-2 network is built from, each from its own source: the frozen vision towers
(EVA ViT-g, CLIP ViT-L, as LAVIS publishes them), the frozen LLMs (transformers) and the Q-Former's BERT
tokenizer."""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ..runtime.download import cached_download
from ..runtime.errors import Blip2Error
from . import registry
from .hub import local_dir_for
from .vision import VisionConfig
from .weights import first_line, read_pth, read_safetensors_dir, refuse_remote_code


TOWERS = {
    "eva-g": VisionConfig(kind="eva", image_size=224, patch_size=14, width=1408, layers=39, heads=16, mlp_dim=6144,
                          layer_norm_eps=1e-6),
    "clip-l": VisionConfig(kind="clip", image_size=224, patch_size=14, width=1024, layers=23, heads=16,
                           mlp_dim=4096, layer_norm_eps=1e-5, quick_gelu=True),
}


QFORMER_TOKENIZER = "google-bert/bert-base-uncased"


def count_indices(state: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


# Where each tower layout keeps what its shape is read from: (class token, patch conv, positions, blocks, first fc).
TOWER_LAYOUTS = {
    "eva": ("cls_token", "patch_embed.proj.weight", "pos_embed", "blocks", "blocks.0.mlp.fc1.weight"),
    "clip": ("class_embedding", "conv1.weight", "positional_embedding", "transformer.resblocks",
             "transformer.resblocks.0.mlp.c_fc.weight"),
}


def infer_vision(state: dict[str, torch.Tensor], preset: VisionConfig, prefix: str = "") -> VisionConfig:
    """Tower shape from its tensors (EVA or CLIP key layout); heads from ``preset`` or 64-wide."""
    kind = next((k for k, layout in TOWER_LAYOUTS.items() if f"{prefix}{layout[0]}" in state), None)
    if kind is None:
        raise Blip2Error("no vision tower weights found (expected EVA or CLIP ViT keys)")
    cls, conv, positions, blocks, fc1 = (f"{prefix}{name}" for name in TOWER_LAYOUTS[kind])
    width, patch, mlp = state[cls].shape[-1], state[conv].shape[-1], state[fc1].shape[0]
    tokens = state[positions].shape[-2]
    layers = count_indices(state, rf"^{re.escape(blocks)}\.(\d+)\.")
    grid = int(round((tokens - 1) ** 0.5))
    heads = preset.heads if width == preset.width else max(1, width // 64)
    return replace(preset, kind=kind, width=width, patch_size=patch, image_size=grid * patch,
                   layers=min(layers, preset.layers) if width == preset.width else layers, heads=heads, mlp_dim=mlp)


def tower_state(raw: dict[str, torch.Tensor], cfg: VisionConfig, what: str) -> dict[str, torch.Tensor]:
    """Tower weights under our names, pruned to ``cfg.layers`` blocks; the pruned tail must be what's left."""
    block = re.compile(r"^(blocks|transformer\.resblocks)\.(\d+)\.")
    head_keys = {"norm.weight", "norm.bias", "head.weight", "head.bias", "ln_post.weight", "ln_post.bias", "proj",
                 "fc_norm.weight", "fc_norm.bias"}
    out = {}
    for key, value in raw.items():
        m = block.match(key)
        if m and int(m.group(2)) >= cfg.layers:
            continue  # the blocks BLIP-2 drops (EVA-CLIP-g's 40th, CLIP-L's 24th)
        if key in head_keys:
            continue  # the final norm / head the penultimate-layer tower has no use for
        out[f"vision.trunk.{key}"] = value
    return with_positions_for(out, cfg, what)


def with_positions_for(state: dict[str, torch.Tensor], cfg: VisionConfig, what: str) -> dict[str, torch.Tensor]:
    """A network state whose tower positions (if it has them) fit ``cfg``'s image size, resampled where they do
    not (the state is changed in place and returned)."""
    key = "vision.trunk.pos_embed" if cfg.kind == "eva" else "vision.trunk.positional_embedding"
    if key in state and state[key].shape[-2] != cfg.num_tokens:
        state[key] = resample_pos(state[key], cfg, what)
    return state


def resample_pos(pos: torch.Tensor, cfg: VisionConfig, what: str) -> torch.Tensor:
    """Bicubic resampling of the patch-position grid (CLS kept), as LAVIS's interpolate_pos_embed."""
    from timm.layers import resample_abs_pos_embed

    squeeze = pos.dim() == 2
    grid = cfg.image_size // cfg.patch_size
    # no antialiasing: its bicubic kernel (PIL's, a = -0.5) is not the one LAVIS resamples with (a = -0.75)
    out = resample_abs_pos_embed(pos.unsqueeze(0) if squeeze else pos, (grid, grid), num_prefix_tokens=1,
                                 antialias=False)
    return out[0] if squeeze else out


def registry_tower_state(name: str, cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """A registry tower's weights (the frozen ViT a checkpoint refers to), under our names."""
    return tower_state(registry_tower_raw(name), cfg, name)


def registry_tower_raw(name: str) -> dict[str, torch.Tensor]:
    """A registry tower's file (``eva-g``, ``clip-l``), downloaded once, as its tensors under LAVIS's names."""
    entry = registry.lookup(name, kind="tower")
    if entry is None:
        raise Blip2Error(f"frozen tower {name!r}: not a registry tower")
    return read_pth(cached_download(entry.where))


def load_llm(name: str, dtype: torch.dtype | None = None):
    """A transformers LM (registry name, hub id or directory) set up as BLIP-2 uses it.

    Returns its config dict, tensors and tokenizer. OPT ends captions at a newline (LAVIS's EOS) and
    Flan-T5 runs with exact GELU (LAVIS's ``dense_act_fn``).
    """
    from transformers import AutoConfig, AutoTokenizer

    entry = registry.lookup(name)
    if entry is not None and entry.kind != "llm":
        raise Blip2Error(f"--llm {name}: not a language model; choose one of opt-2.7b, opt-6.7b, flant5-xl, flant5-xxl")
    path = local_dir_for(entry.where if entry is not None else name)
    refuse_remote_code(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False).to_dict()
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise Blip2Error(f"--llm {name}: not a transformers language model ({first_line(e)})") from None
    if config.get("is_encoder_decoder"):
        if config.get("model_type") == "t5":
            config["dense_act_fn"] = "gelu"
        tok.padding_side = "right"
    else:
        newline = tok("\n", add_special_tokens=False).input_ids
        if newline:
            config["eos_token_id"] = newline[-1]
        tok.padding_side = "left"
    return config, read_safetensors_dir(path), tok


def load_qformer_tokenizer(name: str):
    """BERT uncased with [DEC] added as BOS (LAVIS ``init_tokenizer``)."""
    from transformers import AutoTokenizer

    path = local_dir_for(name)
    refuse_remote_code(path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tok.bos_token is None or tok.bos_token != "[DEC]":
        tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok
