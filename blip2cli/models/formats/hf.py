"""transformers' BLIP-2 directories (``Blip2ForConditionalGeneration``, ``Blip2ForImageTextRetrieval``) and
InstructBLIP ones (``InstructBlipForConditionalGeneration``: a Q-Former that reads the question): load, and export
to them."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...runtime.errors import Blip2Error
from ...runtime.io import atomic_dir
from .. import keymaps
from ..assemble import Checkpoint, build, full_state, llm_padding_side
from ..blip2 import Blip2Config
from ..qformer import QFormerConfig
from ..vision import CLIP_MEAN, CLIP_STD, VisionConfig
from ..weights import (WEIGHTS_FILE, few_keys, first_line, load_tokenizer, read_safetensors_dir, refuse_remote_code,
                       untie_for_saving)


# where InstructBlipProcessor looks for its second tokenizer
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"


def config_from_hf(hf) -> Blip2Config:
    """Our config from a ``transformers.Blip2Config`` or ``transformers.InstructBlipConfig``."""
    v, q = hf.vision_config, hf.qformer_config
    if getattr(v, "hidden_act", "gelu") != "gelu" or not getattr(v, "qkv_bias", True):
        raise Blip2Error("unsupported vision config: BLIP-2 towers use exact GELU and q/v biases")
    archs = hf.architectures or []
    instruct = hf.model_type == "instructblip"
    retrieval = not instruct and ("Blip2ForImageTextRetrieval" in archs or (q.use_qformer_text_input and not archs))
    vision = VisionConfig(kind="eva", image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size,
                          layers=v.num_hidden_layers, heads=v.num_attention_heads, mlp_dim=v.intermediate_size,
                          layer_norm_eps=v.layer_norm_eps)
    qformer = QFormerConfig(
        hidden_size=q.hidden_size, num_layers=q.num_hidden_layers, num_heads=q.num_attention_heads,
        intermediate_size=q.intermediate_size, encoder_width=v.hidden_size, num_query_tokens=hf.num_query_tokens,
        cross_attention_frequency=q.cross_attention_frequency, vocab_size=q.vocab_size,
        max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
        dropout=q.hidden_dropout_prob, attention_dropout=q.attention_probs_dropout_prob,
        pad_token_id=q.pad_token_id if q.pad_token_id is not None else 0,
        has_text=retrieval or instruct, has_lm_head=False,
    )
    text = None if retrieval else hf.text_config.to_dict()
    return Blip2Config(vision=vision, qformer=qformer, text=text,
                       embed_dim=getattr(hf, "image_text_hidden_size", Blip2Config.embed_dim),
                       ln_vision_eps=v.layer_norm_eps,
                       image_token_id=None if retrieval else hf.image_token_index, qformer_text_input=instruct)


def config_to_hf(cfg: Blip2Config):
    """A ``transformers.Blip2Config`` for our config, or an ``InstructBlipConfig`` where the Q-Former reads the
    question (EVA-style towers only)."""
    from transformers import Blip2Config as HFConfig, InstructBlipConfig

    v, q = cfg.vision, cfg.qformer
    if v.kind != "eva":
        raise Blip2Error("transformers' BLIP-2 cannot represent a CLIP ViT-L tower; export needs an EVA ViT")
    vision = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers,
                  num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                  layer_norm_eps=v.layer_norm_eps, hidden_act="gelu", qkv_bias=True)
    qformer = dict(hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
                   intermediate_size=q.intermediate_size, cross_attention_frequency=q.cross_attention_frequency,
                   vocab_size=q.vocab_size, max_position_embeddings=q.max_position_embeddings,
                   layer_norm_eps=q.layer_norm_eps, hidden_dropout_prob=q.dropout,
                   attention_probs_dropout_prob=q.attention_dropout, pad_token_id=q.pad_token_id,
                   encoder_hidden_size=v.width)
    if cfg.qformer_text_input:
        hf = InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=dict(cfg.text),
                                num_query_tokens=q.num_query_tokens, image_token_index=cfg.image_token_id)
        hf.architectures = ["InstructBlipForConditionalGeneration"]
        return hf
    qformer["use_qformer_text_input"] = q.has_text
    kwargs: dict[str, Any] = dict(vision_config=vision, qformer_config=qformer, num_query_tokens=q.num_query_tokens,
                                  image_text_hidden_size=cfg.embed_dim)
    if cfg.text is not None:
        kwargs.update(text_config=dict(cfg.text), image_token_index=cfg.image_token_id)
    hf = HFConfig(**kwargs)
    hf.architectures = ["Blip2ForConditionalGeneration" if cfg.text is not None else "Blip2ForImageTextRetrieval"]
    return hf


def load_hf_dir(path: Path, dtype: torch.dtype | None = None, generation: str | None = None) -> Checkpoint:
    """A transformers ``Blip2ForConditionalGeneration`` / ``Blip2ForImageTextRetrieval`` /
    ``InstructBlipForConditionalGeneration`` directory."""
    from transformers import Blip2Config as HFConfig, InstructBlipConfig

    path = Path(path)
    refuse_remote_code(path)
    try:
        config_class = InstructBlipConfig if _model_type(path) == "instructblip" else HFConfig
        hf = config_class.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise Blip2Error(f"{path}: not a BLIP-2 checkpoint directory ({first_line(e)})") from None
    cfg = config_from_hf(hf)
    raw = read_safetensors_dir(path)
    lm_state = {k[len("language_model."):]: raw.pop(k) for k in [k for k in raw if k.startswith("language_model.")]}
    state, unknown = keymaps.translate(raw, _keys(cfg).to_ours,
                                       skip=("embeddings.position_ids", "qformer.embeddings.position_ids"))
    if unknown:
        raise Blip2Error(f"{path}: unexpected keys {few_keys(sorted(unknown))}")
    net = build(cfg, state, lm_state if cfg.text is not None else None, str(path), dtype,
                allow_missing={"temp"})
    tok = load_tokenizer(path, llm_padding_side(cfg)) if cfg.text is not None else None
    qtok = load_tokenizer(path / QFORMER_TOKENIZER_DIR) if cfg.qformer_text_input else (
        load_tokenizer(path) if cfg.text is None else None)
    return Checkpoint(net, cfg, tok, qtok, generation if cfg.text is not None else None, str(path))


def _model_type(path: Path) -> str | None:
    """``model_type`` of a directory's ``config.json`` (None where unreadable: the config class reports that)."""
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def _keys(cfg: Blip2Config) -> keymaps.KeyMap:
    return keymaps.INSTRUCTBLIP_KEYS if cfg.qformer_text_input else keymaps.HF_KEYS


def export_hf(ckpt: Checkpoint, out: Path, add_files: Callable[[Path], None] | None = None) -> Path:
    """Write a directory ``transformers`` loads as ``Blip2ForConditionalGeneration`` or ``Blip2ForImageTextRetrieval``,
    or, for a Q-Former that reads the question, as ``InstructBlipForConditionalGeneration`` with an
    ``InstructBlipProcessor`` (its Q-Former tokenizer in ``qformer_tokenizer/``).

    An image-to-text model without an ``<image>`` token gets one; when the LLM's vocabulary has no
    free row for it, the exported embeddings (and LM head) grow by that one row. ``add_files`` adds files (e.g. the
    model card) to the directory before it takes its name: a failure there leaves ``out`` as it was.
    """
    from safetensors.torch import save_file

    cfg, tok = ckpt.config, ckpt.tokenizer if ckpt.config.text is not None else ckpt.qformer_tokenizer
    if cfg.qformer_text_input and ckpt.qformer_tokenizer is None:
        raise Blip2Error("cannot export to InstructBLIP: this checkpoint has no Q-Former tokenizer for the question")
    grown: dict[str, torch.Tensor] = {}
    if cfg.text is not None and cfg.image_token_id is None:
        cfg, tok = _with_image_token(cfg, tok)
        if cfg.text["vocab_size"] > ckpt.config.text["vocab_size"]:
            grown = grown_embeddings(ckpt.net.language_model.model, cfg.text["vocab_size"])
    hf = config_to_hf(cfg)
    if cfg.ln_vision_eps != cfg.vision.layer_norm_eps:
        print(f"note: transformers' BLIP-2 normalises the ViT output with the tower's LayerNorm eps "
              f"({cfg.vision.layer_norm_eps:g}); this model's ln_vision uses {cfg.ln_vision_eps:g}", file=sys.stderr)
    ours = keymaps.fuse_qkv_bias(full_state(ckpt.net))
    ours.update({f"language_model.model.{k}": v for k, v in grown.items()})
    state: dict[str, torch.Tensor] = {}
    for key, value in ours.items():
        if key == "temp" or key.startswith("qformer.lm_head."):
            continue  # transformers' classes have no temperature and no Q-Former LM head
        new = _keys(cfg).to_theirs(key)
        if new is None:
            raise Blip2Error(f"cannot export {key}: no transformers counterpart")
        state[new] = value.detach().contiguous()
    state = untie_for_saving(state)
    with atomic_dir(out) as tmp:
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        hf.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        if cfg.qformer_text_input:
            ckpt.qformer_tokenizer.save_pretrained(tmp / QFORMER_TOKENIZER_DIR)
            # InstructBlipProcessor expands one <image> per query: it reads their number here
            processor = {"processor_class": "InstructBlipProcessor", "num_query_tokens": cfg.qformer.num_query_tokens}
            (tmp / "processor_config.json").write_text(json.dumps(processor, indent=2))
        _write_preprocessor(tmp, cfg.vision.image_size)
        if add_files is not None:
            add_files(tmp)
    return out


def _with_image_token(cfg: Blip2Config, tokenizer):
    """transformers places the soft prompts at ``<image>`` ids: give the tokenizer one (LAVIS files and
    blip2's own runs lack it), and the LLM config a vocabulary that holds it."""
    import copy
    from dataclasses import replace

    tok = copy.deepcopy(tokenizer)
    if "<image>" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    image_id = tok.convert_tokens_to_ids("<image>")
    text = dict(cfg.text, vocab_size=max(cfg.text["vocab_size"], image_id + 1))
    return replace(cfg, text=text, image_token_id=image_id), tok


def grown_embeddings(lm: nn.Module, rows: int) -> dict[str, torch.Tensor]:
    """The LLM's input embeddings and LM head grown to ``rows``, under the LLM's state-dict names.

    What ``resize_token_embeddings`` does, deterministically: each new row is the mean of the old ones
    (transformers draws it from a normal of that mean). An LM-head row that is the mean of the others
    gives the mean of their logits, never above the largest, so greedy search cannot pick the new token.
    Tied weights stay one tensor.
    """
    targets = [lm.get_input_embeddings().weight]
    if lm.get_output_embeddings() is not None:
        targets.append(lm.get_output_embeddings().weight)
    new: dict[int, torch.Tensor] = {}
    for weight in targets:
        if id(weight) not in new:
            old = weight.detach()
            extra = old.float().mean(dim=0, keepdim=True).to(old.dtype).expand(rows - old.shape[0], -1)
            new[id(weight)] = torch.cat([old, extra])
    return {name: new[id(p)] for name, p in lm.named_parameters(remove_duplicate=False) if id(p) in new}


def _write_preprocessor(path: Path, size: int) -> None:
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True,
    }, indent=2))
