"""A BLIP-2 network from loaded tensors: built on the meta device, every key accounted for, the load dtype
applied once to the whole network."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..runtime.errors import Blip2Error
from . import keymaps
from .blip2 import Blip2Config, Blip2ImageToText, Blip2Stage1
from .llm import build_language_model
from .weights import few_keys, first_line


# Kept in float32 whatever the load dtype: the trainable bridge (as transformers and LAVIS do).
FP32_PARTS = ("qformer", "ln_vision", "vision_proj", "text_proj", "itm_head", "temp")


FP32_PREFIXES = tuple(f"{p}." if p != "temp" else p for p in FP32_PARTS)


@dataclass
class Checkpoint:
    """A built network with what it needs to read inputs."""

    net: nn.Module  # Blip2ImageToText or Blip2Stage1
    config: Blip2Config
    tokenizer: Any  # the LLM's tokenizer (image-to-text) or None
    qformer_tokenizer: Any  # the Q-Former's BERT tokenizer, where the checkpoint has a text side
    generation: str | None  # name of the generation recipe with this model's decoding defaults
    source: str  # what was loaded, for messages and provenance
    # frozen components saved by reference, not by value: {"vision": "eva-g", "language_model": "opt-2.7b"}
    frozen_sources: dict[str, str] = field(default_factory=dict)


def _assign(net: nn.Module, state: dict[str, torch.Tensor], what: str, allow_missing: set[str] = frozenset()) -> None:
    """Load ``state`` into a meta-device network by assignment; any missing or extra key is an error."""
    expected = set(net.state_dict().keys())
    tied = {"qformer.lm_head.decoder.weight"}  # the word embeddings, re-tied after loading
    missing = sorted(expected - set(state) - set(allow_missing) - tied)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {few_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {few_keys(unexpected)}")
        raise Blip2Error(f"{what}: {'; '.join(parts)}")
    net.load_state_dict(state, strict=False, assign=True)


def _materialise(net: nn.Module, cfg: Blip2Config) -> None:
    """Fill what a checkpoint may omit (defaults, non-persistent buffers) and re-tie weights."""
    for name, p in list(net.named_parameters()):
        if p.is_meta and name == "temp":
            net.temp = nn.Parameter(torch.tensor([0.07]))
    for module in net.modules():
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                # timm's zero k-bias (non-persistent) and other derived buffers.
                module.register_buffer(bname, torch.zeros(buf.shape, dtype=buf.dtype),
                                       persistent=bname not in module._non_persistent_buffers_set)
    net.qformer.tie_weights()
    leftovers = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
    if leftovers:
        raise Blip2Error(f"weights missing after loading: {few_keys(leftovers)}")


def _set_k_bias(net: nn.Module, k_biases: dict[str, torch.Tensor]) -> None:
    for key, value in k_biases.items():
        net.get_submodule(key.rsplit(".", 1)[0]).k_bias = value


def apply_dtype(net: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Give every floating tensor of ``net`` the load dtype (None: float32), buffers included.

    The one place a load's dtype is applied, once the network holds all its tensors: the tower's
    non-persistent buffers (timm's k-bias) and anything else not read from the file follow the
    weights. ``FP32_PARTS`` stay float32; the language model keeps what transformers gave it when it
    loaded it in ``dtype`` (its own float32 exceptions included).
    """
    target = dtype or torch.float32
    for name, child in net.named_children():
        if name != "language_model":
            child.to(torch.float32 if name in FP32_PARTS else target)
    for name, param in net.named_parameters(recurse=False):
        if param.is_floating_point():
            param.data = param.data.to(torch.float32 if name in FP32_PARTS else target)
    return net


def build(cfg: Blip2Config, state: dict[str, torch.Tensor], lm_state: dict[str, torch.Tensor] | None,
          what: str, dtype: torch.dtype | None = None, allow_missing: set[str] = frozenset()) -> nn.Module:
    """A network from our-named tensors (``state``) and, for image-to-text, the LLM's own tensors."""
    state = keymaps.split_qkv_bias(state)
    k_biases = {k: state.pop(k) for k in [k for k in state if k.endswith("attn.k_bias")]}
    if cfg.text is not None:
        if lm_state is None:
            raise Blip2Error(f"{what}: no language-model weights")
        try:
            lm = build_language_model(cfg.text, lm_state, dtype=dtype or torch.float32)
        except Exception as e:  # transformers reports shape mismatches its own way
            raise Blip2Error(f"{what}: the language-model weights do not fit its config ({first_line(e)})") from None
        with torch.device("meta"):
            net = Blip2ImageToText(cfg, language_model=lm)  # lm keeps its real tensors
        state = {k: v for k, v in state.items() if not k.startswith("language_model.")}
        expected_lm = {f"language_model.model.{k}" for k in lm.state_dict()}
        allow_missing = set(allow_missing) | expected_lm
    else:
        with torch.device("meta"):
            net = Blip2Stage1(cfg)
    _assign(net, state, what, allow_missing)
    _materialise(net, cfg)
    _set_k_bias(net, k_biases)
    return apply_dtype(net, dtype).eval()


def llm_padding_side(cfg: Blip2Config) -> str:
    """Left padding for decoder-only LLMs (the prompt ends where generation starts), right for encoder-decoders."""
    is_enc_dec = bool(cfg.text and cfg.text.get("is_encoder_decoder"))
    return "right" if is_enc_dec else "left"


def full_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The network's tensors with timm's (non-persistent) k-biases and without tied duplicates."""
    state = {k: v for k, v in net.state_dict().items() if k != "qformer.lm_head.decoder.weight"}
    for name, module in net.named_modules():
        if getattr(module, "k_bias", None) is not None and name.startswith("vision."):
            state[f"{name}.k_bias"] = module.k_bias
    return state
