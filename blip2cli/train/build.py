"""Build a stage's network, tokenizer and task from a recipe (and, for stage 2, a stage-1 checkpoint)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..runtime.errors import Blip2Error
from ..models import keymaps, tiny
from ..models.assemble import Checkpoint
from ..models.components import TOWERS, load_llm, load_qformer_tokenizer, registry_tower_raw, tower_state
from ..models.hub import local_dir_for
from ..models.weights import few_keys, read_safetensors_dir
from ..models.blip2 import Blip2Base, Blip2Config, Blip2ImageToText, Blip2Stage1
from ..models.llm import build_language_model
from ..models.vision import VisionConfig
from ..runtime import dist
from ..runtime.devices import dtype_of
from .recipe import PretrainRecipe
from .tasks import Stage1Task, Stage2Task



def _tower(recipe: PretrainRecipe) -> tuple[VisionConfig, dict[str, torch.Tensor] | None]:
    """The frozen tower's config and pretrained weights (None: random weights, e.g. the tiny recipes)."""
    m = recipe.model
    if isinstance(m.vision, VisionConfig):
        return replace(m.vision, image_size=m.image_size), None
    if m.vision not in TOWERS:
        raise Blip2Error(f"model.vision {m.vision!r}: expected {', '.join(TOWERS)} or an inline tower config")
    cfg = replace(TOWERS[m.vision], image_size=m.image_size)
    return cfg, tower_state(registry_tower_raw(m.vision), cfg, m.vision)


def qformer_tokenizer(name: str):
    return tiny.qformer_tokenizer() if name == "tiny" else load_qformer_tokenizer(name)


def bert_init(name: str, vocab_size: int) -> dict[str, torch.Tensor]:
    """BERT weights under our Q-Former names; each query FFN starts as a copy of its text FFN (LAVIS)."""
    raw = read_safetensors_dir(local_dir_for(name))
    unused = ("pooler.", "seq_relationship.", "token_type_embeddings.", "position_ids")  # BLIP-2 has none of these
    raw = {_modern_norm_names("Qformer." + k if k.startswith(("bert.", "cls.")) else "Qformer.bert." + k): v
           for k, v in raw.items() if not any(u in k for u in unused)}
    state, unknown = keymaps.translate(raw, keymaps.lavis_keys(None).to_ours, skip=keymaps.LAVIS_REDUNDANT)
    if unknown:
        raise Blip2Error(f"--qformer_init {name}: unexpected BERT keys {few_keys(sorted(unknown))}")
    for key in [k for k in state if ".text_ffn." in k]:
        state[key.replace(".text_ffn.", ".query_ffn.")] = state[key].clone()
    for key in ("qformer.embeddings.word.weight", "qformer.lm_head.decoder.bias"):
        if key in state and state[key].shape[0] < vocab_size:  # room for [DEC]
            old = state[key]
            extra = old.new_empty((vocab_size - old.shape[0], *old.shape[1:]))
            extra.normal_(0, 0.02) if old.dim() > 1 else extra.zero_()
            state[key] = torch.cat([old, extra])
    return state


def _modern_norm_names(key: str) -> str:
    """Old BERT checkpoints name LayerNorm parameters gamma/beta."""
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def _load_partial(net: nn.Module, state: dict[str, torch.Tensor], what: str, may_miss: tuple[str, ...]) -> None:
    """Load what ``state`` has; every one of its keys must land, and only ``may_miss`` may stay unset."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(may_miss) and k != "qformer.lm_head.decoder.weight"]
    if unexpected or missing:
        raise Blip2Error(f"{what}: unexpected keys {few_keys(sorted(unexpected))}; "
                         f"missing keys {few_keys(sorted(missing))}")


def freeze(modules: list[nn.Module], dtype: torch.dtype) -> None:
    for m in modules:
        m.requires_grad_(False)
        m.to(dtype)
        m.eval()


def build_stage1(recipe: PretrainRecipe) -> tuple[Stage1Task, Checkpoint]:
    """The stage-1 task (network, BERT tokenizer, losses) and the checkpoint that will be saved from it."""
    m = recipe.model
    tok = qformer_tokenizer(m.tokenizer)
    vision_cfg, vision_state = _tower(recipe)
    qcfg = replace(m.qformer, encoder_width=vision_cfg.width, vocab_size=len(tok), has_text=True, has_lm_head=True,
                   max_txt_len=recipe.stage1.max_txt_len)  # the checkpoint reads texts as it was trained
    cfg = Blip2Config(vision=vision_cfg, qformer=qcfg, embed_dim=m.embed_dim, ln_vision_eps=m.ln_vision_eps)
    torch.manual_seed(recipe.train.seed)  # identical initial weights on every rank
    net = Blip2Stage1(cfg)
    if vision_state is not None:
        _load_partial(net, vision_state, f"tower {m.vision}", may_miss=("qformer.", "ln_vision.", "vision_proj.",
                                                                        "text_proj.", "itm_head.", "temp"))
    if m.qformer_init:
        _load_partial(net, bert_init(m.qformer_init, qcfg.vocab_size), f"Q-Former init {m.qformer_init}",
                      may_miss=("vision.", "ln_vision.", "vision_proj.", "text_proj.", "itm_head.", "temp",
                                "qformer.query_tokens", "qformer.layers"))
    freeze([net.vision], dtype_of(m.frozen_dtype))
    task = Stage1Task(net, tok, replace(recipe.stage1, seed=recipe.train.seed))
    sources = {"vision": m.vision} if vision_state is not None else {}
    return task, Checkpoint(net, cfg, None, tok, None, "stage1", sources)


def _tiny_llm_dir(run_root: Path, recipe: PretrainRecipe) -> Path:
    """The tiny recipe's LLM: trained once on the synthetic captions (by rank 0), then reused."""
    from ..data.synthetic import COLOURS, SHAPES, caption

    out = run_root / "tiny-llm"
    if dist.rank() == 0 and not (out / "config.json").exists():
        tiny.pretrain_llm([caption(c, s) for c in COLOURS for s in SHAPES], out, recipe.model.tiny_llm,
                          seed=recipe.train.seed)
    if dist.is_distributed():
        torch.distributed.barrier()
    return out


def build_stage2(recipe: PretrainRecipe, init: str, run_root: Path) -> tuple[Stage2Task, Checkpoint]:
    """Stage 2 from a stage-1 checkpoint: its tower, ``ln_vision`` and query path; a new projection."""
    from ..models.resolve import load_checkpoint

    m = recipe.model
    if not init:
        raise Blip2Error("stage 2 starts from a stage-1 checkpoint: pass --init RUN_DIR (or a checkpoint)")
    if not m.llm:
        raise Blip2Error("model.llm is empty: name the frozen LLM (opt-2.7b, flant5-xl, ..., or tiny)")
    first = load_checkpoint(init)
    if not isinstance(first.net, Blip2Stage1):
        raise Blip2Error(f"--init {init}: not a stage-1 checkpoint")
    llm_name = str(_tiny_llm_dir(run_root, recipe)) if m.llm == "tiny" else m.llm
    text, lm_state, tok = load_llm(llm_name)
    frozen = dtype_of(m.frozen_dtype)
    lm = build_language_model(text, lm_state, dtype=frozen)
    qcfg = replace(first.config.qformer, has_text=False, has_lm_head=False)
    cfg = Blip2Config(vision=first.config.vision, qformer=qcfg, text=text, ln_vision_eps=first.config.ln_vision_eps)
    torch.manual_seed(recipe.train.seed)
    net = Blip2ImageToText(cfg, language_model=lm)
    keep = {k: v for k, v in first.net.state_dict().items()
            if k.startswith(("vision.", "ln_vision.")) or (k.startswith("qformer.") and _query_path(k))}
    _load_partial(net, keep, f"--init {init}", may_miss=("language_projection.", "language_model."))
    freeze(net.frozen_modules(), frozen)
    task = Stage2Task(net, tok, replace(recipe.stage2, seed=recipe.train.seed))
    sources = {k: v for k, v in first.frozen_sources.items() if k == "vision"}
    if m.llm != "tiny" and not Path(m.llm).exists():  # a registry name or hub id can be fetched again
        sources["language_model"] = m.llm
    return task, Checkpoint(net, cfg, tok, None, "caption", "stage2", sources)


# changes a fine-tune makes to the network it starts from: (config, weights, loaded checkpoint) -> (config, weights)
Adapt = Callable[[Blip2Config, dict[str, torch.Tensor], Checkpoint], tuple[Blip2Config, dict[str, torch.Tensor]]]


def fine_tune_start(recipe: PretrainRecipe, init: str, kind: type[Blip2Base], needs: str, llm: str | None = None,
                     max_txt_len: int | None = None, adapt: Adapt | None = None
                     ) -> tuple[Blip2Base, Checkpoint, dict[str, str]]:
    """What a fine-tune starts from: ``init`` loaded in float32 (refused in one line ending in ``needs`` unless it is
    a ``kind`` model), rebuilt at ``model.image_size`` with its tower positions resampled (and the Q-Former reading
    ``max_txt_len`` tokens, when given), its ViT trained in float32 or frozen as the recipe says. Returns the network,
    the loaded checkpoint (its tokenizers and frozen sources) and ``{"vision": source}`` when the frozen ViT is
    kept by reference (empty when it is trained: the fine-tuned ViT is saved by value)."""
    from ..models.components import with_positions_for
    from ..models.resolve import load_checkpoint

    m = recipe.model
    start = load_checkpoint(init, llm=llm, dtype=torch.float32)
    if not isinstance(start.net, kind):
        raise Blip2Error(f"--init {init}: {needs}")
    vision = replace(start.config.vision, image_size=m.image_size)
    if m.image_size % vision.patch_size:
        raise Blip2Error(f"model.image_size {m.image_size}: not a multiple of the tower's patch size "
                         f"{vision.patch_size}")
    qformer = start.config.qformer
    if max_txt_len is not None:
        if max_txt_len > qformer.max_position_embeddings:
            raise Blip2Error(f"stage1.max_txt_len {max_txt_len}: the Q-Former of --init {init} has "
                             f"{qformer.max_position_embeddings} text positions")
        qformer = replace(qformer, max_txt_len=max_txt_len)
    cfg = replace(start.config, vision=vision, qformer=qformer)
    state = with_positions_for(start.net.state_dict(), vision, f"--init {init}")
    if adapt is not None:
        cfg, state = adapt(cfg, state, start)
    extra = {"language_model": start.net.language_model.model} if isinstance(start.net, Blip2ImageToText) else {}
    net = type(start.net)(cfg, **extra)
    _load_partial(net, state, f"--init {init}", may_miss=())
    if m.train_vision:
        net.vision.requires_grad_(True)
        if m.vision_grad_checkpointing:
            net.vision.set_grad_checkpointing(True)
    else:
        freeze([net.vision], dtype_of(m.frozen_dtype))
    by_reference = {} if m.train_vision or "vision" not in start.frozen_sources else {
        "vision": start.frozen_sources["vision"]}
    return net, start, by_reference


def build_caption(recipe: PretrainRecipe, init: str, llm: str | None = None) -> tuple[Stage2Task, Checkpoint]:
    """A caption fine-tune of a stage-2 model: its LLM frozen (kept by reference), its ViT (by value, float32, its
    positions resampled to the recipe's image size), ``ln_vision``, Q-Former and projection trained. ``llm``: the
    LLM of a LAVIS stage-2 ``.pth``."""
    if not init:
        raise Blip2Error("a caption fine-tune starts from a stage-2 model: pass --init (blip2-opt-2.7b, a LAVIS "
                         "stage-2 .pth with --llm, or runs/<stage2 run>/latest)")
    net, start, sources = fine_tune_start(recipe, init, Blip2ImageToText,
                                           "not a stage-2 (image-to-text) model; a caption fine-tune starts from one",
                                           llm=llm)
    freeze([net.language_model], dtype_of(recipe.model.frozen_dtype))
    task = Stage2Task(net, start.tokenizer, replace(recipe.stage2, seed=recipe.train.seed))
    if "language_model" in start.frozen_sources:
        sources["language_model"] = start.frozen_sources["language_model"]
    return task, Checkpoint(net, net.config, start.tokenizer, None, "caption-coco", "caption", sources)


def build_retrieval(recipe: PretrainRecipe, init: str) -> tuple[Stage1Task, Checkpoint]:
    """A retrieval fine-tune of a stage-1 model (``lavis-stage1-vit-g``, ``runs/<stage1 run>/latest``): ITC, ITM and
    ITG as in stage 1 (``recipe.stage1``, whose ``same_image_positives`` pairs COCO's captions by image), with the
    ViT (by value, float32, its positions resampled to the recipe's image size), ``ln_vision``, Q-Former and heads
    all trained unless the recipe freezes the ViT. Saved as a stage-1 model."""
    if not init:
        raise Blip2Error("a retrieval fine-tune starts from a stage-1 model: pass --init (lavis-stage1-vit-g or "
                         "runs/<stage1 run>/latest)")
    net, start, sources = fine_tune_start(
        recipe, init, Blip2Stage1, "not a stage-1 model (with ITC/ITM heads); a retrieval fine-tune starts from one, "
        "e.g. lavis-stage1-vit-g or runs/<stage1 run>/latest", max_txt_len=recipe.stage1.max_txt_len)
    tok = start.qformer_tokenizer
    if tok is None:
        raise Blip2Error(f"--init {init}: no Q-Former tokenizer; a retrieval fine-tune reads captions with it")
    task = Stage1Task(net, tok, replace(recipe.stage1, seed=recipe.train.seed))
    return task, Checkpoint(net, net.config, None, tok, None, "retrieval", sources)


def _query_path(key: str) -> bool:
    """Q-Former weights stage 2 keeps: everything but the text embeddings, text FFNs and ITG head."""
    return not any(part in key for part in (".embeddings.", ".text_ffn.", ".lm_head."))
