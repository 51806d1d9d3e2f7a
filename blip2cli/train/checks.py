"""What a pretraining run is given, checked before any model is built: the recipe ``--vit`` / ``--llm`` /
``--recipe`` choose, the data it reads (each missing directory named with the commands that make it) and
the stage-1 run stage 2 starts from."""

from __future__ import annotations

from pathlib import Path

from ..config import recipes_root
from ..runtime.errors import Blip2Error

DEFAULTS = {"stage1": "eva-g", "stage2": "opt-2.7b"}  # the tower and LLM of the paper's first recipes
FLAGS = {"stage1": "--vit", "stage2": "--llm"}


def paper_choices(stage: str) -> list[str]:
    """The names ``--vit`` / ``--llm`` accept: one per recipe ``pretrain/<stage>_<name>.yaml``."""
    return sorted(p.stem.split("_", 1)[1] for p in (recipes_root() / "pretrain").glob(f"{stage}_*.yaml"))


def recipe_name(recipe: str, stage: str) -> str:
    """``--recipe tiny`` is short for ``tiny/<stage>``."""
    if (recipes_root() / recipe / f"{stage}.yaml").exists():
        return f"{recipe}/{stage}"
    return recipe


def choose_recipe(stage: str, recipe: str | None, choice: str | None) -> str:
    """The recipe to run: ``--recipe`` if given, else the paper's for ``--vit`` / ``--llm`` (or the default)."""
    choices = paper_choices(stage)
    if choice is not None and choice not in choices:
        raise Blip2Error(f"{FLAGS[stage]} {choice!r}: choose {', '.join(choices)} (or --recipe FILE for another)")
    if recipe is not None:
        return recipe_name(recipe, stage)
    return f"pretrain/{stage}_{choice or DEFAULTS[stage]}"


def check_agrees(stage: str, recipe_name: str, spec, choice: str | None) -> None:
    """``--vit`` / ``--llm`` given beside ``--recipe`` must name what the recipe trains with."""
    field, value = ("vision", spec.model.vision) if stage == "stage1" else ("llm", spec.model.llm)
    if choice is not None and value != choice:
        shown = value if isinstance(value, str) else "an inline tower"
        raise Blip2Error(f"{FLAGS[stage]} {choice} disagrees with recipe {recipe_name}, which trains with "
                         f"model.{field} {shown}: drop one of them (or --set model.{field}={choice})")


# what each run starts from: (the model it needs, the command that makes one, how an error names the run)
STARTS = {"stage2": ("stage-1", "pretrain stage1", "stage 2"),
          "caption": ("stage-2", "pretrain stage2", "a caption fine-tune"),
          "vqa": ("stage-2", "pretrain stage2", "a VQA fine-tune"),
          "retrieval": ("stage-1", "pretrain stage1", "a retrieval fine-tune")}


def check_init(init: str | None, stage: str = "stage2") -> None:
    """Stage 2 and a retrieval fine-tune start from a stage-1 model, a caption or VQA fine-tune from a stage-2 model:
    a missing local one is named before any model loads."""
    before, maker, what = STARTS[stage]
    if not init:
        raise Blip2Error(f"{what} starts from a {before} checkpoint: pass --init RUN_DIR (a `blip2 {maker}` run) or a "
                         f"{before} model name")
    path = Path(init).expanduser()
    in_a_dir = path.parent != Path(".") and path.parent.is_dir()  # runs/x is a path; Salesforce/x a hub id
    local = init.count("/") > 1 or init.startswith((".", "/", "~")) or in_a_dir
    if local and not path.exists():
        raise Blip2Error(f"--init {init}: no such run directory or checkpoint; `blip2 {maker}` writes one "
                         "(runs/<name>/, its latest checkpoint under runs/<name>/latest)")


def source_missing(source) -> bool:
    """Whether a recipe's data source is absent from this machine (remote shards are not checked)."""
    from ..data.datasets import expand_shards

    if source.kind.startswith("shapes"):
        return False
    if source.kind in ("caption_json", "vqa_json"):
        return not Path(source.path).is_file() or not Path(source.image_root).is_dir()
    if "://" in source.path or source.path.startswith("pipe:"):
        return False
    try:
        expand_shards(source.path)
    except Blip2Error:
        return True
    return False


def how_to_make(path: str) -> str:
    """The commands that make a data path: a pretraining directory (from the ``prepare`` recipe that names it) or an
    annotation file (``blip2 prepare`` of the dataset that lists it)."""
    from ..config import read_yaml
    from ..data.annotations import ANNOTATIONS

    name = Path(path).name
    for dataset, files in ANNOTATIONS.items():
        if any(f.name == name for f in files):
            return f" (make it: `blip2 prepare {dataset}`)"

    for file in sorted((recipes_root() / "prepare").glob("*.yaml")):
        data = read_yaml(file)
        if data.get("pretraining_dir") == path.rstrip("/") and data.get("pretraining_steps"):
            return f" (make it: {', then '.join(f'`{step}`' for step in data['pretraining_steps'])})"
    return ""


def check_data(recipe_name: str, spec) -> None:
    """Every local source the recipe reads must be there: the missing ones, and how to make them, in one line."""
    missing = [s.path for s in spec.data.sources if source_missing(s)]
    if missing:
        listed = "; ".join(f"{path}{how_to_make(path)}" for path in missing)
        raise Blip2Error(f"recipe {recipe_name} reads data that is not here: {listed}; README 'Data preparation' "
                         "has the details (or --set data.sources=... for other data)")
