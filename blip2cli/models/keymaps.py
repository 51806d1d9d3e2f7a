"""State-dict key mappings between blip2's modules, transformers' BLIP-2 and InstructBLIP classes and LAVIS
checkpoints.

Each table is a list of prefix pairs ``(ours, theirs)``; ``{n}`` stands for a layer index. Translation
is exact and reversible: a key no rule covers is reported, never dropped. The ViT's fused q/k/v bias
(transformers) versus separate q/v biases (LAVIS, timm) is handled by ``split_qkv_bias`` /
``fuse_qkv_bias``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

PrefixRules = list[tuple[str, str]]

_QFORMER_LAYER = [
    ("self_attn.query.", "{attn}.{self}.query."),
    ("self_attn.key.", "{attn}.{self}.key."),
    ("self_attn.value.", "{attn}.{self}.value."),
    ("self_attn.out.", "{attn}.output.dense."),
    ("self_attn.norm.", "{attn}.output.LayerNorm."),
    ("cross_attn.query.", "crossattention.{self}.query."),
    ("cross_attn.key.", "crossattention.{self}.key."),
    ("cross_attn.value.", "crossattention.{self}.value."),
    ("cross_attn.out.", "crossattention.output.dense."),
    ("cross_attn.norm.", "crossattention.output.LayerNorm."),
    ("query_ffn.fc1.", "intermediate_query.dense."),
    ("query_ffn.fc2.", "output_query.dense."),
    ("query_ffn.norm.", "output_query.LayerNorm."),
    ("text_ffn.fc1.", "intermediate.dense."),
    ("text_ffn.fc2.", "output.dense."),
    ("text_ffn.norm.", "output.LayerNorm."),
]


def _qformer_layers(prefix: str, self_name: str) -> PrefixRules:
    return [
        (f"qformer.layers.{{n}}.{ours}", f"{prefix}.encoder.layer.{{n}}." + theirs.format(attn="attention", self=self_name))
        for ours, theirs in _QFORMER_LAYER
    ]


_EVA_BLOCK_HF = [
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
    ("attn.qkv.", "self_attn.qkv."),
    ("attn.proj.", "self_attn.projection."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
]

HF_RULES: PrefixRules = [
    ("vision.trunk.cls_token", "vision_model.embeddings.class_embedding"),
    ("vision.trunk.pos_embed", "vision_model.embeddings.position_embedding"),
    ("vision.trunk.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    *[(f"vision.trunk.blocks.{{n}}.{a}", f"vision_model.encoder.layers.{{n}}.{b}") for a, b in _EVA_BLOCK_HF],
    ("ln_vision.", "vision_model.post_layernorm."),
    ("qformer.query_tokens", "query_tokens"),
    ("qformer.embed_norm.", "qformer.layernorm."),
    ("qformer.embeddings.word.", "embeddings.word_embeddings."),
    ("qformer.embeddings.position.", "embeddings.position_embeddings."),
    *_qformer_layers("qformer", "attention"),
    ("vision_proj.", "vision_projection."),
    ("text_proj.", "text_projection."),
    ("itm_head.", "itm_head."),
    ("language_projection.", "language_projection."),
    ("language_model.model.", "language_model."),
]

# InstructBLIP's Q-Former owns its text embeddings and names its embedding LayerNorm among them.
_INSTRUCTBLIP_EMBEDDINGS = {
    "qformer.embed_norm.": "qformer.embeddings.layernorm.",
    "qformer.embeddings.word.": "qformer.embeddings.word_embeddings.",
    "qformer.embeddings.position.": "qformer.embeddings.position_embeddings.",
}
INSTRUCTBLIP_RULES: PrefixRules = [(ours, _INSTRUCTBLIP_EMBEDDINGS.get(ours, theirs)) for ours, theirs in HF_RULES]

LAVIS_RULES: PrefixRules = [
    ("vision.trunk.", "visual_encoder."),
    ("ln_vision.", "ln_vision."),
    ("qformer.query_tokens", "query_tokens"),
    ("qformer.embed_norm.", "Qformer.bert.embeddings.LayerNorm."),
    ("qformer.embeddings.word.", "Qformer.bert.embeddings.word_embeddings."),
    ("qformer.embeddings.position.", "Qformer.bert.embeddings.position_embeddings."),
    *_qformer_layers("Qformer.bert", "self"),
    ("qformer.lm_head.dense.", "Qformer.cls.predictions.transform.dense."),
    ("qformer.lm_head.norm.", "Qformer.cls.predictions.transform.LayerNorm."),
    ("qformer.lm_head.decoder.bias", "Qformer.cls.predictions.bias"),
    ("vision_proj.", "vision_proj."),
    ("text_proj.", "text_proj."),
    ("itm_head.", "itm_head."),
    ("temp", "temp"),
    ("language_projection.", "{proj}."),
]

# Keys LAVIS files carry that hold nothing of their own: a buffer, and aliases of tied weights.
LAVIS_REDUNDANT = ("Qformer.bert.embeddings.position_ids", "Qformer.cls.predictions.decoder.weight",
                   "Qformer.cls.predictions.decoder.bias")


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)"))


class KeyMap:
    """Translate keys by prefix rules, in either direction."""

    def __init__(self, rules: PrefixRules, **fill: str) -> None:
        rules = [(a.format(n="{n}", **fill), b.format(n="{n}", **fill)) for a, b in rules]
        self._to_theirs = [(_compile(a), b) for a, b in rules]
        self._to_ours = [(_compile(b), a) for a, b in rules]

    @staticmethod
    def _apply(key: str, rules) -> str | None:
        for pattern, target in rules:
            m = pattern.match(key)
            if m:
                return target.replace("{n}", m.groupdict().get("n") or "") + key[m.end():]
        return None

    def to_ours(self, key: str) -> str | None:
        return self._apply(key, self._to_ours)

    def to_theirs(self, key: str) -> str | None:
        return self._apply(key, self._to_theirs)


def translate(state: Mapping[str, torch.Tensor], convert, skip: Iterable[str] = ()) -> tuple[dict, list[str]]:
    """Apply ``convert`` to every key; returns the translated dict and the keys it could not place."""
    skip = set(skip)
    out, unknown = {}, []
    for key, value in state.items():
        if key in skip:
            continue
        new = convert(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    return out, unknown


_QKV_BIAS = re.compile(r"^vision\.trunk\.blocks\.(\d+)\.attn\.qkv\.bias$")


def split_qkv_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each fused ``attn.qkv.bias`` [3D] by timm's ``q_bias``, ``k_bias`` and ``v_bias`` [D]."""
    out = {}
    for key, value in state.items():
        m = _QKV_BIAS.match(key)
        if m is None:
            out[key] = value
            continue
        q, k, v = value.chunk(3)
        base = key[: -len("qkv.bias")]
        out[base + "q_bias"], out[base + "k_bias"], out[base + "v_bias"] = q, k, v
    return out


def fuse_qkv_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``split_qkv_bias``; a missing ``k_bias`` is zero (timm and LAVIS never train it)."""
    out = dict(state)
    for key in [k for k in state if k.endswith("attn.q_bias")]:
        base = key[: -len("q_bias")]
        q, v = out.pop(base + "q_bias"), out.pop(base + "v_bias")
        k = out.pop(base + "k_bias", None)
        out[base + "qkv.bias"] = torch.cat([q, torch.zeros_like(q) if k is None else k.to(q.dtype), v])
    return out


HF_KEYS = KeyMap(HF_RULES)
INSTRUCTBLIP_KEYS = KeyMap(INSTRUCTBLIP_RULES)


def lavis_keys(llm_kind: str | None) -> KeyMap:
    """LAVIS names its projection ``opt_proj`` or ``t5_proj`` by LLM family."""
    return KeyMap(LAVIS_RULES, proj="t5_proj" if llm_kind == "t5" else "opt_proj")
