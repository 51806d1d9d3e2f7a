"""The original LAVIS ``.pth`` checkpoints (stage 1, stage 2, fine-tuned), loaded strictly.

A LAVIS file holds the Q-Former side; the frozen tower (when the file lacks ``visual_encoder.*``) and
the LLM come from their own sources. Shapes are read off the tensors; head counts, which tensors do
not show, come from the tower presets (EVA ViT-g: 16, CLIP ViT-L: 16) and BERT's 64-wide heads."""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ...runtime.errors import Blip2Error
from .. import keymaps
from ..assemble import Checkpoint, build
from ..blip2 import Blip2Config
from ..components import QFORMER_TOKENIZER, TOWERS, count_indices, infer_vision, load_llm, load_qformer_tokenizer, registry_tower_raw, tower_state
from ..qformer import QFormerConfig
from ..vision import VisionConfig
from ..weights import few_keys, read_pth


LAVIS_LN_VISION_EPS = 1e-5  # nn.LayerNorm's default, which LAVIS's ln_vision uses


LLM_PREFIX = {"opt_proj": "opt_model.", "t5_proj": "t5_model."}  # the frozen LLM's module in LAVIS's models


def infer_qformer(state: dict[str, torch.Tensor], heads: int | None = None) -> QFormerConfig:
    """The Q-Former's config read off a LAVIS state dict (layers, widths, cross-attention spacing, heads
    from ``heads`` or BERT's 64-wide)."""
    q = state["query_tokens"]
    hidden = q.shape[-1]
    pre = "Qformer.bert."
    has_text = f"{pre}embeddings.word_embeddings.weight" in state
    cross = sorted(int(m.group(1)) for k in state if (m := re.match(rf"^{re.escape(pre)}encoder\.layer\.(\d+)\.crossattention\.self\.key\.weight$", k)))
    return QFormerConfig(
        hidden_size=hidden, num_layers=count_indices(state, rf"^{re.escape(pre)}encoder\.layer\.(\d+)\."),
        num_heads=heads or max(1, hidden // 64),
        intermediate_size=state[f"{pre}encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        encoder_width=state[f"{pre}encoder.layer.{cross[0]}.crossattention.self.key.weight"].shape[1],
        num_query_tokens=q.shape[1], cross_attention_frequency=cross[1] - cross[0] if len(cross) > 1 else 2,
        vocab_size=state[f"{pre}embeddings.word_embeddings.weight"].shape[0] if has_text else 30523,
        max_position_embeddings=state[f"{pre}embeddings.position_embeddings.weight"].shape[0] if has_text else 512,
        has_text=has_text, has_lm_head="Qformer.cls.predictions.bias" in state,
    )


def load_lavis(path: Path, llm: str | None = None, vision: str | VisionConfig | None = None,
               dtype: torch.dtype | None = None, generation: str | None = "caption", image_size: int | None = None,
               qformer_heads: int | None = None, qformer_tokenizer: str = QFORMER_TOKENIZER) -> Checkpoint:
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
        name = vision if isinstance(vision, str) else "eva-g"
        tower_raw = registry_tower_raw(name)
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
        raise Blip2Error(f"{path}: unexpected keys {few_keys(sorted(unknown))}")
    if text is None and not qformer.has_text:
        raise Blip2Error(f"{path}: a stage-2 Q-Former without its projection")
    state.update(vit_state)
    net = build(cfg, state, lm_state, str(path), dtype)
    if llm_copies:
        check_llm_copies(llm_copies, prefix, net.language_model.model, path)
    qtok = None
    if qformer.has_text:
        qtok = load_qformer_tokenizer(qformer_tokenizer)
    return Checkpoint(net, cfg, tok, qtok, generation if text is not None else None, str(path))


def check_llm_copies(copies: dict[str, torch.Tensor], prefix: str, lm: torch.nn.Module, path: Path) -> None:
    """LLM tensors in a LAVIS file: only what LAVIS's runner leaves there, and never loaded.

    The runner saves ``state_dict()`` minus the frozen entries of ``named_parameters()``, which lists a
    tied weight once: the frozen LLM's tied aliases stay in the file (OPT's ``lm_head.weight``, Flan-T5's
    encoder and decoder ``embed_tokens.weight``). Those are accepted when they are the LLM's own weights, and
    named in one stderr line when not; any other LLM key is an unexpected key. Equality is exact at the
    coarser of the two precisions (LAVIS saved the copies in its training dtype, the LLM here is in the load
    dtype).
    """
    frozen = {name for name, _ in lm.named_parameters()}
    leftovers = {prefix + k: v for k, v in lm.state_dict().items() if k not in frozen}
    unknown = sorted(set(copies) - set(leftovers))
    if unknown:
        raise Blip2Error(f"{path}: unexpected keys {few_keys(unknown)}")
    differ = [k for k, copy in copies.items() if not _same_weights(copy, leftovers[k])]
    if differ:
        print(f"warning: {path.name}: {', '.join(differ)} differ from the language model's weights; "
              "ignored (the language model's own are used)", file=sys.stderr)


def _same_weights(copy: torch.Tensor, ref: torch.Tensor) -> bool:
    if copy.shape != ref.shape:
        return False
    return torch.equal(copy.to(ref.dtype), ref) or torch.equal(copy, ref.to(copy.dtype))
