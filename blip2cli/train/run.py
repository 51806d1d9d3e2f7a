"""A pretraining run end to end: choose and check the recipe, join the process group, seed, lock the run
directory and choose the checkpoint to continue, build the stage's model, train, and (stage 2 on shapes)
write held-out samples to try."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import Blip2Error
from ..runtime.extras import require_extra
from .checks import check_agrees, check_data, check_init, choose_recipe
from .recipe import PretrainRecipe


@dataclass
class Pretrained:
    """What a finished run left (rank 0): its last checkpoint and, for stage 2 on shapes, held-out samples."""

    checkpoint: Path
    samples: Path | None = None


def default_name(recipe_name: str) -> str:
    """The run name of a recipe: ``tiny/stage1`` -> ``tiny-stage1``; a YAML file -> its stem."""
    return Path(recipe_name).stem if recipe_name.endswith((".yaml", ".yml")) else recipe_name.replace("/", "-")


def pretrain(stage: str, recipe: str | None = None, choice: str | None = None, overrides: list[str] | None = None,
             out: Path = Path("runs"), name: str | None = None, resume: str = "auto", init: str | None = None,
             overwrite: bool = False) -> Pretrained | None:
    """Pretrain ``stage`` (stage1, stage2) with ``recipe`` (else the paper's for the tower or LLM ``choice``,
    which must then agree with it), ``overrides`` applied, in ``out/name``; stage 2 starts from ``init``.
    The recipe's data and the stage-1 run are checked before anything is built. ``resume``: auto, never or a
    checkpoint; ``overwrite`` starts over. See ``train`` for what it returns."""
    from ..config import load_recipe

    require_extra("train", "blip2 pretrain")
    recipe_name = choose_recipe(stage, recipe, choice)
    spec = load_recipe(PretrainRecipe, recipe_name, one_length(overrides or []))
    if spec.stage != stage:
        raise Blip2Error(f"recipe {recipe_name} is a {spec.stage} recipe, not {stage}")
    check_agrees(stage, recipe_name, spec, choice)
    check_data(recipe_name, spec)
    if stage == "stage2":
        check_init(init)
    return train(stage, spec, out / (name or default_name(recipe_name)), out, resume, init, overwrite)


# each fine-tune's recipes (``recipes/finetune/<task>_<data>_<model>.yaml``) and the model of its default one
FINETUNE_DEFAULTS = {"caption": "opt-2.7b", "vqa": "opt-2.7b", "retrieval": "vit-g"}


def finetune_recipe(task: str, init: str | None) -> str:
    """The paper's recipe for fine-tuning ``init`` for ``task``: the one whose model ``init`` names
    (``blip2-flan-t5-xl`` -> ``caption_coco_flant5-xl``), else the task's default."""
    from ..config import recipes_root

    def squeezed(text: str) -> str:
        return text.lower().replace("-", "").replace("_", "")

    names = sorted(p.stem for p in (recipes_root() / "finetune").glob(f"{task}_*.yaml"))
    for name in names:
        if init and squeezed(name.rsplit("_", 1)[1]) in squeezed(init):
            return f"finetune/{name}"
    return f"finetune/{next(n for n in names if n.endswith('_' + FINETUNE_DEFAULTS[task]))}"


def one_length(overrides: list[str]) -> list[str]:
    """``--set train.steps=N`` replaces a recipe's ``train.epochs`` (and the other way round)."""
    keys = {item.split("=", 1)[0].strip() for item in overrides}
    for given, other in (("train.steps", "train.epochs"), ("train.epochs", "train.steps")):
        if given in keys and other not in keys:
            overrides = [*overrides, f"{other}=null"]
    return overrides


def finetune(task: str, recipe: str | None = None, overrides: list[str] | None = None, out: Path = Path("runs"),
             name: str | None = None, resume: str = "auto", init: str | None = None, llm: str | None = None,
             overwrite: bool = False) -> Pretrained | None:
    """Fine-tune ``init`` for ``task`` (caption, vqa, retrieval) with ``recipe`` (default: the paper's for the model
    ``init`` names), ``overrides`` applied, in ``out/name``. The recipe's data and ``init`` are checked before
    anything is built; ``llm`` names the LLM of a LAVIS stage-2 ``.pth``. See ``train`` for what it returns."""
    from ..config import load_recipe
    from .checks import recipe_name

    require_extra("train", "blip2 finetune")
    name_of_recipe = recipe_name(recipe, task) if recipe else finetune_recipe(task, init)
    spec = load_recipe(PretrainRecipe, name_of_recipe, one_length(overrides or []))
    if spec.stage != task:
        raise Blip2Error(f"recipe {name_of_recipe} is a {spec.stage} recipe, not a {task} fine-tune")
    check_data(name_of_recipe, spec)
    check_init(init, task)
    return train(task, spec, out / (name or default_name(name_of_recipe)), out, resume, init, overwrite, llm)


def train(stage: str, spec: PretrainRecipe, run_dir: Path, out: Path, resume: str = "auto", init: str | None = None,
          overwrite: bool = False, llm: str | None = None) -> Pretrained | None:
    """Train a checked recipe in ``run_dir`` (in one process, or as one rank under a launcher). Returns, on
    rank 0, the last checkpoint and any samples written; None on other ranks or when nothing was saved."""
    from ..runtime import dist
    from ..runtime.progress import quiet_transformers
    from . import build, loop

    quiet_transformers()
    device = dist.init_distributed()
    loop.seed_everything(spec.train.seed + dist.rank())
    start = loop.prepare(run_dir, resume, overwrite)  # lock the run directory, choose the checkpoint
    if stage == "stage1":
        task, ckpt = build.build_stage1(spec)
    elif stage == "caption":
        task, ckpt = build.build_caption(spec, init or "", llm)
    elif stage == "vqa":
        from .vqa import build_vqa

        task, ckpt = build_vqa(spec, init or "", llm)
    elif stage == "retrieval":
        task, ckpt = build.build_retrieval(spec, init or "")
    else:
        task, ckpt = build.build_stage2(spec, init or "", out)
    last = loop.run(spec, task, ckpt, start, device)
    if dist.rank() != 0 or last is None:
        return None
    samples = None
    if stage in ("stage2", "caption") and any(s.kind == "shapes" for s in spec.data.sources):
        from ..data.synthetic import write_samples

        samples = write_samples(run_dir, spec.model.image_size)
    return Pretrained(last, samples)
