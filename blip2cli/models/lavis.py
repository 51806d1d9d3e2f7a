"""Load the original LAVIS ``.pth`` checkpoints (stage 1, stage 2, fine-tuned), strictly.

A LAVIS file holds the Q-Former side; the frozen tower (when the file lacks ``visual_encoder.*``) and
the LLM come from their own sources. Shapes are read off the tensors; head counts, which tensors do
not show, come from the tower presets (EVA ViT-g: 16, CLIP ViT-L: 16) and BERT's 64-wide heads.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import Blip2Error
from . import checkpoints, keymaps, registry
from .blip2 import Blip2Config
from .qformer import QFormerConfig
from .vision import VisionConfig

TOWERS = {
    "eva-g": VisionConfig(kind="eva", image_size=224, patch_size=14, width=1408, layers=39, heads=16, mlp_dim=6144,
                          layer_norm_eps=1e-6),
    "clip-l": VisionConfig(kind="clip", image_size=224, patch_size=14, width=1024, layers=23, heads=16,
                           mlp_dim=4096, layer_norm_eps=1e-5, quick_gelu=True),
}
LAVIS_LN_VISION_EPS = 1e-5  # nn.LayerNorm's default, which LAVIS's ln_vision uses
LLM_PREFIX = {"opt_proj": "opt_model.", "t5_proj": "t5_model."}  # the frozen LLM's module in LAVIS's models
QFORMER_TOKENIZER = "google-bert/bert-base-uncased"


def read_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise Blip2Error(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0][:120]})") from None
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise Blip2Error(f"{path}: expected a state dict (or a dict with a 'model' state dict)")
    return raw


def _count(state: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def infer_vision(state: dict[str, torch.Tensor], preset: VisionConfig, prefix: str = "") -> VisionConfig:
    """Tower shape from its tensors (EVA or CLIP key layout); heads from ``preset`` or 64-wide."""
    if f"{prefix}cls_token" in state:
        width = state[f"{prefix}cls_token"].shape[-1]
        patch = state[f"{prefix}patch_embed.proj.weight"].shape[-1]
        tokens = state[f"{prefix}pos_embed"].shape[1]
        layers = _count(state, rf"^{re.escape(prefix)}blocks\.(\d+)\.")
        mlp = state[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0]
        kind = "eva"
    elif f"{prefix}class_embedding" in state:
        width = state[f"{prefix}class_embedding"].shape[-1]
        patch = state[f"{prefix}conv1.weight"].shape[-1]
        tokens = state[f"{prefix}positional_embedding"].shape[0]
        layers = _count(state, rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
        mlp = state[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        kind = "clip"
    else:
        raise Blip2Error("no vision tower weights found (expected EVA or CLIP ViT keys)")
    grid = int(round((tokens - 1) ** 0.5))
    heads = preset.heads if width == preset.width else max(1, width // 64)
    return replace(preset, kind=kind, width=width, patch_size=patch, image_size=grid * patch,
                   layers=min(layers, preset.layers) if width == preset.width else layers, heads=heads, mlp_dim=mlp)


def infer_qformer(state: dict[str, torch.Tensor], heads: int | None = None) -> QFormerConfig:
    q = state["query_tokens"]
    hidden = q.shape[-1]
    pre = "Qformer.bert."
    has_text = f"{pre}embeddings.word_embeddings.weight" in state
    cross = sorted(int(m.group(1)) for k in state if (m := re.match(rf"^{re.escape(pre)}encoder\.layer\.(\d+)\.crossattention\.self\.key\.weight$", k)))
    return QFormerConfig(
        hidden_size=hidden, num_layers=_count(state, rf"^{re.escape(pre)}encoder\.layer\.(\d+)\."),
        num_heads=heads or max(1, hidden // 64),
        intermediate_size=state[f"{pre}encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        encoder_width=state[f"{pre}encoder.layer.{cross[0]}.crossattention.self.key.weight"].shape[1],
        num_query_tokens=q.shape[1], cross_attention_frequency=cross[1] - cross[0] if len(cross) > 1 else 2,
        vocab_size=state[f"{pre}embeddings.word_embeddings.weight"].shape[0] if has_text else 30523,
        max_position_embeddings=state[f"{pre}embeddings.position_embeddings.weight"].shape[0] if has_text else 512,
        has_text=has_text, has_lm_head="Qformer.cls.predictions.bias" in state,
    )


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
    pos_key = "vision.trunk.pos_embed" if cfg.kind == "eva" else "vision.trunk.positional_embedding"
    if pos_key in out and out[pos_key].shape[-2] != cfg.num_tokens:
        out[pos_key] = _resample_pos(out[pos_key], cfg, what)
    return out


def _resample_pos(pos: torch.Tensor, cfg: VisionConfig, what: str) -> torch.Tensor:
    """Bicubic resampling of the patch-position grid (CLS kept), as LAVIS's interpolate_pos_embed."""
    from timm.layers import resample_abs_pos_embed

    squeeze = pos.dim() == 2
    grid = cfg.image_size // cfg.patch_size
    out = resample_abs_pos_embed(pos.unsqueeze(0) if squeeze else pos, (grid, grid), num_prefix_tokens=1)
    return out[0] if squeeze else out


def load_llm(name: str, dtype: torch.dtype | None = None):
    """A transformers LM (registry name, hub id or directory) set up as BLIP-2 uses it.

    Returns its config dict, tensors and tokenizer. OPT ends captions at a newline (LAVIS's EOS) and
    Flan-T5 runs with exact GELU (LAVIS's ``dense_act_fn``).
    """
    from transformers import AutoConfig, AutoTokenizer

    from .hub import local_dir_for

    entry = registry.lookup(name)
    if entry is not None and entry.kind != "llm":
        raise Blip2Error(f"--llm {name}: not a language model; choose one of opt-2.7b, opt-6.7b, flant5-xl, flant5-xxl")
    path = local_dir_for(entry.where if entry is not None else name)
    checkpoints.refuse_remote_code(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False).to_dict()
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise Blip2Error(f"--llm {name}: not a transformers language model ({checkpoints._first_line(e)})") from None
    if config.get("is_encoder_decoder"):
        if config.get("model_type") == "t5":
            config["dense_act_fn"] = "gelu"
        tok.padding_side = "right"
    else:
        newline = tok("\n", add_special_tokens=False).input_ids
        if newline:
            config["eos_token_id"] = newline[-1]
        tok.padding_side = "left"
    return config, checkpoints.read_safetensors_dir(path), tok


def load_lavis(path: Path, llm: str | None = None, vision: str | VisionConfig | None = None,
               dtype: torch.dtype | None = None, generation: str | None = "caption", image_size: int | None = None,
               qformer_heads: int | None = None, qformer_tokenizer: str = QFORMER_TOKENIZER) -> checkpoints.Checkpoint:
    """A LAVIS checkpoint; stage-2 files need ``llm``, files without a ViT take it from ``vision``."""
    path = Path(path)
    raw = read_pth(path)
    proj = next((p for p in ("opt_proj", "t5_proj") if f"{p}.weight" in raw), None)
    if proj is not None and llm is None:
        raise Blip2Error(f"{path.name} is a LAVIS stage-2 checkpoint: name its language model with --llm "
                         "(opt-2.7b, opt-6.7b, flant5-xl, flant5-xxl, or a transformers directory)")
    if "query_tokens" not in raw:
        raise Blip2Error(f"{path}: not a BLIP-2 checkpoint (no query_tokens)")
    preset = vision if isinstance(vision, VisionConfig) else TOWERS.get(vision or "eva-g", TOWERS["eva-g"])
    own_vit = {k[len("visual_encoder."):]: v for k, v in raw.items() if k.startswith("visual_encoder.")}
    if own_vit:
        vision_cfg = infer_vision(own_vit, preset)
        vit_state = tower_state(own_vit, vision_cfg, str(path))
    else:
        from .hub import download_url

        name = vision if isinstance(vision, str) else "eva-g"
        tower_raw = read_pth(download_url(registry.REGISTRY[name].where))
        vision_cfg = replace(infer_vision(tower_raw, preset), image_size=image_size or preset.image_size)
        vit_state = tower_state(tower_raw, vision_cfg, name)
    qformer = infer_qformer(raw, qformer_heads)
    qformer = replace(qformer, encoder_width=vision_cfg.width)

    text, lm_state, tok = None, None, None
    if proj is not None:
        text, lm_state, tok = load_llm(llm, dtype)
    cfg = Blip2Config(vision=vision_cfg, qformer=qformer, text=text, embed_dim=raw["vision_proj.weight"].shape[0]
                      if "vision_proj.weight" in raw else 256, ln_vision_eps=LAVIS_LN_VISION_EPS)

    km = keymaps.lavis_keys("t5" if proj == "t5_proj" else "opt")
    body = {k: v for k, v in raw.items() if not k.startswith("visual_encoder.")}
    prefix = LLM_PREFIX.get(proj)
    llm_copies = {k: body.pop(k) for k in [k for k in body if prefix and k.startswith(prefix)]}
    tied = body.get("Qformer.cls.predictions.decoder.weight")
    if tied is not None and not torch.equal(tied, body["Qformer.bert.embeddings.word_embeddings.weight"]):
        raise Blip2Error(f"{path}: the Q-Former LM head is not tied to the word embeddings")
    state, unknown = keymaps.translate(body, km.to_ours, skip=keymaps.LAVIS_REDUNDANT)
    if "temp" in state:
        state["temp"] = state["temp"].reshape(1)  # LAVIS stores a 0-dim tensor
    if unknown:
        raise Blip2Error(f"{path}: unexpected keys {checkpoints._few(sorted(unknown))}")
    if text is None and not qformer.has_text:
        raise Blip2Error(f"{path}: a stage-2 Q-Former without its projection")
    state.update(vit_state)
    net = checkpoints.build(cfg, state, lm_state, str(path), dtype)
    if llm_copies:
        check_llm_copies(llm_copies, prefix, net.language_model.model, path)
    qtok = None
    if qformer.has_text:
        qtok = _qformer_tokenizer(qformer_tokenizer)
    return checkpoints.Checkpoint(net, cfg, tok, qtok, generation if text is not None else None, str(path))


def check_llm_copies(copies: dict[str, torch.Tensor], prefix: str, lm: torch.nn.Module, path: Path) -> None:
    """LLM tensors in a LAVIS file: only what LAVIS's runner leaves there, and never loaded.

    The runner saves ``state_dict()`` minus the frozen entries of ``named_parameters()``, which lists a
    tied weight once: the frozen LLM's tied aliases stay in the file (OPT's ``lm_head.weight``, Flan-T5's
    encoder and decoder ``embed_tokens.weight``). Those are accepted when they are the LLM's own weights, and
    named in one stderr line when not; any other LLM key is an unexpected key. Equality is exact at the
    coarser of the two precisions (LAVIS saved the copies in its training dtype, the LLM here is in the load
    dtype).
    """
    import sys

    frozen = {name for name, _ in lm.named_parameters()}
    leftovers = {prefix + k: v for k, v in lm.state_dict().items() if k not in frozen}
    unknown = sorted(set(copies) - set(leftovers))
    if unknown:
        raise Blip2Error(f"{path}: unexpected keys {checkpoints._few(unknown)}")
    differ = [k for k, copy in copies.items() if not _same_weights(copy, leftovers[k])]
    if differ:
        print(f"warning: {path.name}: {', '.join(differ)} differ from the language model's weights; "
              "ignored (the language model's own are used)", file=sys.stderr)


def _same_weights(copy: torch.Tensor, ref: torch.Tensor) -> bool:
    if copy.shape != ref.shape:
        return False
    return torch.equal(copy.to(ref.dtype), ref) or torch.equal(copy, ref.to(copy.dtype))


def _qformer_tokenizer(name: str):
    """BERT uncased with [DEC] added as BOS (LAVIS ``init_tokenizer``)."""
    from transformers import AutoTokenizer

    from .hub import local_dir_for

    path = local_dir_for(name)
    checkpoints.refuse_remote_code(path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tok.bos_token is None or tok.bos_token != "[DEC]":
        tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok
