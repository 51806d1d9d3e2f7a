"""The training recipe schema: pretraining (``recipes/pretrain``) and fine-tuning (``recipes/finetune``), and their
``tiny`` versions. Recipes hold the numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import checked
from ..runtime.devices import DTYPES
from ..runtime.errors import Blip2Error
from ..models.qformer import QFormerConfig
from ..models.tiny import TinyLLM
from ..models.vision import VisionConfig
from .tasks import Stage1Loss, Stage2Loss


@dataclass
class InlineTower(VisionConfig):
    """A frozen tower a recipe describes inline (random weights, e.g. the tiny recipes): every size given."""

    kind: str = field(kw_only=True)
    image_size: int = field(kw_only=True)
    patch_size: int = field(kw_only=True)
    width: int = field(kw_only=True)
    layers: int = field(kw_only=True)
    heads: int = field(kw_only=True)
    mlp_dim: int = field(kw_only=True)


@dataclass
class QFormerShape(QFormerConfig):
    """The Q-Former a stage-1 recipe trains: every size given (the paper's is BERT-base with 32 queries; its text
    length, width at the image side and vocabulary come from the recipe's stage1, tower and tokenizer)."""

    hidden_size: int = field(kw_only=True)
    num_layers: int = field(kw_only=True)
    num_heads: int = field(kw_only=True)
    intermediate_size: int = field(kw_only=True)
    num_query_tokens: int = field(kw_only=True)
    max_position_embeddings: int = field(kw_only=True)
    dropout: float = field(kw_only=True)
    attention_dropout: float = field(kw_only=True)


@dataclass
class ModelRecipe:
    image_size: int = checked(ge=1)
    # the frozen tower and LLM (paper: fp16 ViT/OPT, bf16 Flan-T5)
    frozen_dtype: str = checked(choices=tuple(DTYPES))
    # stage 1, which stage 2 takes from its --init checkpoint:
    # a registry tower (pretrained weights, e.g. eva-g) or an inline config (random frozen weights)
    vision: str | InlineTower | None = None
    qformer: QFormerShape | None = None
    # BERT weights for the Q-Former ("" for random); query FFNs start as copies of the text FFNs
    qformer_init: str | None = None
    tokenizer: str | None = None  # Q-Former tokenizer ([DEC] added); "tiny" built in
    embed_dim: int | None = checked(None, ge=1)  # ITC projection width
    ln_vision_eps: float = 1e-5  # LAVIS's ln_vision
    # stage 2: registry LLM, hub id or directory; "tiny" pretrains a small LM on the captions (``tiny_llm``)
    llm: str = ""
    tiny_llm: TinyLLM | None = None
    # fine-tuning: the ViT is trained too (kept in float32; the step autocasts), its positions resampled to
    # image_size when the --init model was trained at another size
    train_vision: bool | None = None  # unset: frozen (pretraining never trains it)
    vision_grad_checkpointing: bool | None = None  # a trained ViT recomputes its blocks' activations in backward
    # VQA fine-tuning: the question's tokens join the queries in the Q-Former's self-attention (unset: they do)
    question_in_qformer: bool | None = None
    # VQA fine-tuning of a model without a Q-Former text side (every stage-2 model): the stage-1 model whose
    # text embeddings, text FFNs and BERT tokenizer the Q-Former reads the question with
    qformer_text_init: str | None = None


@dataclass
class SourceRecipe:
    # shapes, shapes_qa: the built-in synthetic sets (one shape and its caption; two shapes and a question)
    kind: str = checked(choices=("shapes", "shapes_qa", "webdataset", "caption_json", "vqa_json"))
    path: str = ""  # shards (directory, brace pattern) or annotation file
    image_root: str = ""
    weight: float | None = checked(None, gt=0)  # its share of the samples (unset in every source: equal shares)
    size: int | None = checked(None, ge=1)  # shapes: number of renderings


@dataclass
class DataRecipe:
    batch_size: int = checked(ge=1)  # per rank and micro-step
    num_workers: int = checked(ge=0)
    min_scale: float = checked(gt=0, le=1)  # random resized crop (paper: crop + flip)
    sources: list[SourceRecipe] = field(default_factory=list)
    max_words: int = checked(50, ge=1)
    # webdataset sources: samples held in each loader's seeded shuffle buffer (0 or 1: none)
    shuffle_buffer: int | None = checked(None, ge=0)
    # sources without weights: equal shares, or shares by size (annotation sources: each pass draws every sample
    # about once, as one concatenated dataset)
    shares: str | None = checked(None, choices=("equal", "size"))  # unset: equal

    def __post_init__(self) -> None:
        weights = [s.weight for s in self.sources]
        if self.shares == "size" and any(w is not None for w in weights):
            raise Blip2Error("data.sources: weights and shares: size both set the shares; give one")
        if all(w is None for w in weights):
            for s in self.sources:
                s.weight = 1.0  # equal shares
        elif None in weights:
            raise Blip2Error("data.sources: give every source a weight, or none (equal shares)")
        if any(s.kind.startswith("shapes") and s.size is None for s in self.sources):
            raise Blip2Error("data.sources: a shapes source needs its size (the number of renderings)")


@dataclass
class OptimRecipe:
    lr: float = checked(gt=0)
    min_lr: float = checked(ge=0)
    warmup_lr: float = checked(ge=0)
    warmup_steps: int = checked(ge=0)
    betas: list[float] = checked(ge=0, lt=1)  # pretraining: the paper's (0.9, 0.98), where LAVIS runs 0.999
    weight_decay: float = checked(0.05, ge=0)
    eps: float = checked(1e-8, gt=0)
    # LAVIS decays the temperature and the query tokens too; by default they are left undecayed here.
    decay_temp_and_queries: bool = False
    # layer-wise learning-rate decay of a trained ViT: block i of d at lr x decay^(d - i), embeddings deepest
    vision_layer_decay: float | None = checked(None, gt=0, le=1)  # unset: none (1)


@dataclass
class TrainRecipe:
    precision: str = checked(choices=("fp32", "bf16", "fp16"))  # autocast of the trainable part
    log_every: int = checked(ge=1)
    save_every: int = checked(ge=1)
    keep_last: int = checked(ge=1)
    seed: int
    # the length of the run: optimiser steps, or epochs (passes over the data, whose size the run counts when it
    # starts: steps = ceil(epochs x samples / global batch)); exactly one of them
    steps: int | None = checked(None, ge=1)
    epochs: float | None = checked(None, gt=0)
    global_batch: int | None = checked(None, ge=1)  # batch_size x world size x accumulation, checked (unset: not)
    grad_accum: int = checked(1, ge=1)
    grad_clip: float = checked(0.0, ge=0)  # 0: none (LAVIS clips nothing)
    # auto (DeepSpeed when launched with several ranks), torch, deepspeed
    engine: str = checked("auto", choices=("auto", "torch", "deepspeed"))
    zero_stage: int = checked(2, choices=(0, 1, 2, 3))
    deepspeed_preset: str = ""  # a file of recipes/deepspeed/ (zero2, zero3), merged into the generated config
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed config, merged last
    # where each step's record goes (rank 0): metrics.jsonl always; tensorboard and wandb add theirs
    loggers: list[str] = checked(default_factory=lambda: ["jsonl"], choices=("jsonl", "tensorboard", "wandb"))

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise Blip2Error("train: give steps or epochs (one of them)")


# what each stage needs the recipe to say (the other stage's are taken from elsewhere or unused)
_STAGE1 = ("model.vision", "model.qformer", "model.qformer_init", "model.tokenizer", "model.embed_dim", "stage1")
_STAGE2 = ("stage2",)


@dataclass
class PretrainRecipe:
    """A training recipe (``recipes/pretrain/``, ``recipes/finetune/``, ``recipes/tiny/``): model, data, optimiser,
    training."""

    # caption, vqa: fine-tuning a stage-2 model; retrieval: fine-tuning a stage-1 model
    stage: str = checked(choices=("stage1", "stage2", "caption", "vqa", "retrieval"))
    model: ModelRecipe
    data: DataRecipe
    optim: OptimRecipe
    train: TrainRecipe
    stage1: Stage1Loss | None = None
    stage2: Stage2Loss | None = None

    def __post_init__(self) -> None:
        if not self.data.sources:
            raise Blip2Error("data.sources is empty: name at least one dataset")
        needs = {"stage1": _STAGE1, "retrieval": ("stage1",)}.get(self.stage, _STAGE2)
        missing = [name for name in needs if _get(self, name) is None]
        if self.stage in ("caption", "vqa", "retrieval") and self.model.llm:
            raise Blip2Error(f"a {self.stage} fine-tune keeps the model of its --init: leave model.llm empty")
        if self.stage == "vqa" and self.stage2 is not None and "{}" not in self.stage2.prompt:
            raise Blip2Error(f"stage2.prompt {self.stage2.prompt!r}: a VQA prompt marks the question with {{}}, "
                             "e.g. 'Question: {} Answer:'")
        if self.stage == "stage2" and self.model.llm == "tiny" and self.model.tiny_llm is None:
            missing.append("model.tiny_llm")
        if any(s.kind == "webdataset" for s in self.data.sources) and self.data.shuffle_buffer is None:
            missing.append("data.shuffle_buffer")
        if missing:
            raise Blip2Error(f"a {self.stage} recipe needs {', '.join(missing)}")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


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
