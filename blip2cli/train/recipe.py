"""The pretraining recipe schema. Recipes (``blip2cli/recipes/pretrain``, ``tiny``) hold the numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import checked
from ..errors import Blip2Error
from ..models.qformer import QFormerConfig
from ..models.vision import VisionConfig
from .tasks import Stage1Loss, Stage2Loss


@dataclass
class ModelRecipe:
    # a registry tower (pretrained weights, e.g. eva-g) or an inline config (random frozen weights)
    vision: str | VisionConfig = "eva-g"
    image_size: int = checked(224, ge=1)
    ln_vision_eps: float = 1e-5  # LAVIS's ln_vision
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    # stage 1: BERT weights for the Q-Former ("" for random); query FFNs start as copies of the text FFNs
    qformer_init: str = "google-bert/bert-base-uncased"
    tokenizer: str = "google-bert/bert-base-uncased"  # Q-Former tokenizer ([DEC] added); "tiny" built in
    embed_dim: int = checked(256, ge=1)
    llm: str = ""  # stage 2: registry LLM, hub id or directory; "tiny" pretrains a small LM on the captions
    # the frozen tower and LLM (paper: fp16 ViT/OPT, bf16 Flan-T5)
    frozen_dtype: str = checked("bfloat16", choices=("float32", "bfloat16", "float16"))


@dataclass
class SourceRecipe:
    kind: str = checked(choices=("shapes", "webdataset", "caption_json"))
    path: str = ""  # shards (directory, brace pattern) or annotation file
    image_root: str = ""
    weight: float = checked(1.0, gt=0)
    size: int = checked(1000, ge=1)  # shapes: number of renderings


@dataclass
class DataRecipe:
    sources: list[SourceRecipe] = field(default_factory=list)
    batch_size: int = checked(16, ge=1)  # per rank and micro-step
    num_workers: int = checked(2, ge=0)
    min_scale: float = checked(0.5, gt=0, le=1)  # random resized crop (paper: crop + flip)
    max_words: int = checked(50, ge=1)


@dataclass
class OptimRecipe:
    lr: float = checked(1e-4, gt=0)
    min_lr: float = checked(1e-5, ge=0)
    warmup_lr: float = checked(1e-6, ge=0)
    warmup_steps: int = checked(2000, ge=0)
    weight_decay: float = checked(0.05, ge=0)
    betas: list[float] = checked(default_factory=lambda: [0.9, 0.98], ge=0, lt=1)  # paper; LAVIS runs 0.999
    eps: float = checked(1e-8, gt=0)
    # LAVIS decays the temperature and the query tokens too; by default they are left undecayed here.
    decay_temp_and_queries: bool = False


@dataclass
class TrainRecipe:
    steps: int = checked(250_000, ge=1)
    global_batch: int = checked(0, ge=0)  # 0: batch_size x world size x accumulation (no check)
    grad_accum: int = checked(1, ge=1)
    precision: str = checked("bf16", choices=("fp32", "bf16", "fp16"))  # autocast of the trainable part
    grad_clip: float = checked(0.0, ge=0)  # 0: none (LAVIS clips nothing)
    # auto (DeepSpeed when launched with several ranks), torch, deepspeed
    engine: str = checked("auto", choices=("auto", "torch", "deepspeed"))
    zero_stage: int = checked(2, choices=(0, 1, 2, 3))
    deepspeed_preset: str = ""  # a file of recipes/deepspeed/ (zero2, zero3), merged into the generated config
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed config, merged last
    log_every: int = checked(10, ge=1)
    save_every: int = checked(1000, ge=1)
    keep_last: int = checked(3, ge=1)
    seed: int = 42


@dataclass
class PretrainRecipe:
    stage: str = checked("stage1", choices=("stage1", "stage2"))
    model: ModelRecipe = field(default_factory=ModelRecipe)
    stage1: Stage1Loss = field(default_factory=Stage1Loss)
    stage2: Stage2Loss = field(default_factory=Stage2Loss)
    data: DataRecipe = field(default_factory=DataRecipe)
    optim: OptimRecipe = field(default_factory=OptimRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)

    def __post_init__(self) -> None:
        if not self.data.sources:
            raise Blip2Error("data.sources is empty: name at least one dataset")


def deepspeed_config(recipe: PretrainRecipe, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config, derived from the recipe (one source for batch, precision, clipping)."""
    t = recipe.train
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": recipe.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": recipe.data.batch_size * t.grad_accum * world_size,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.grad_clip:
        cfg["gradient_clipping"] = t.grad_clip
    if t.global_batch and t.global_batch != cfg["train_batch_size"]:
        raise Blip2Error(f"train.global_batch {t.global_batch} != batch_size {recipe.data.batch_size} x accumulation "
                         f"{t.grad_accum} x {world_size} ranks = {cfg['train_batch_size']}")
    if t.deepspeed_preset:
        from ..config import read_yaml, recipe_path

        preset = read_yaml(recipe_path(f"deepspeed/{t.deepspeed_preset}"))
        stage = preset.get("zero_optimization", {}).get("stage", t.zero_stage)
        if stage != t.zero_stage:
            raise Blip2Error(f"train.deepspeed_preset {t.deepspeed_preset} is ZeRO-{stage} but train.zero_stage is "
                             f"{t.zero_stage}")
        cfg = _merge(cfg, preset)
    return _merge(cfg, t.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
