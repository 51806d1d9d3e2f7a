"""``blip2 pretrain stage1|stage2``: the two pretraining stages, in one process or under a launcher.

``--vit`` (stage 1) and ``--llm`` (stage 2) pick the paper's recipe ``pretrain/<stage>_<name>``; ``--recipe``
names any other. The data the recipe reads is checked before a model is built.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import recipes_root
from ..errors import Blip2Error
from .options import SetOpt

app = typer.Typer(help="Pretrain the Q-Former: stage 1 (representation) and stage 2 (generation).",
                  no_args_is_help=True)

DEFAULTS = {"stage1": "eva-g", "stage2": "opt-2.7b"}  # the tower and LLM of the paper's first recipes
FLAGS = {"stage1": "--vit", "stage2": "--llm"}


def paper_choices(stage: str) -> list[str]:
    """The names ``--vit`` / ``--llm`` accept: one per recipe ``pretrain/<stage>_<name>.yaml``."""
    return sorted(p.stem.split("_", 1)[1] for p in (recipes_root() / "pretrain").glob(f"{stage}_*.yaml"))


def _recipe_help(stage: str) -> str:
    names = [f"pretrain/{stage}_{name}" for name in paper_choices(stage)]
    if (recipes_root() / "tiny" / f"{stage}.yaml").exists():
        names.append(f"tiny (tiny/{stage})")
    return (f"Recipe name or YAML file; wins over {FLAGS[stage]}, which must then agree with it. "
            f"Packaged: {', '.join(names)}.")


Stage1RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", help=_recipe_help("stage1"))]
Stage2RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", help=_recipe_help("stage2"))]
VitOpt = Annotated[Optional[str], typer.Option(
    "--vit", help=f"Frozen image encoder: {', '.join(paper_choices('stage1'))} (the paper's recipe "
                  f"pretrain/stage1_<vit>; default {DEFAULTS['stage1']}).")]
LlmOpt = Annotated[Optional[str], typer.Option(
    "--llm", help=f"Frozen LLM: {', '.join(paper_choices('stage2'))} (the paper's recipe pretrain/stage2_<llm>; "
                  f"default {DEFAULTS['stage2']}).")]
OutOpt = Annotated[Path, typer.Option(help="Directory that holds the runs.")]
NameOpt = Annotated[Optional[str], typer.Option(help="Run name (default: the stage and recipe).")]
ResumeOpt = Annotated[str, typer.Option(help="auto (continue the run's latest checkpoint), never, or a checkpoint.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Start over: delete the run's checkpoints, metrics.")]


def _recipe_name(recipe: str, stage: str) -> str:
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
        return _recipe_name(recipe, stage)
    return f"pretrain/{stage}_{choice or DEFAULTS[stage]}"


def check_agrees(stage: str, recipe_name: str, spec, choice: str | None) -> None:
    """``--vit`` / ``--llm`` given beside ``--recipe`` must name what the recipe trains with."""
    field, value = ("vision", spec.model.vision) if stage == "stage1" else ("llm", spec.model.llm)
    if choice is not None and value != choice:
        shown = value if isinstance(value, str) else "an inline tower"
        raise Blip2Error(f"{FLAGS[stage]} {choice} disagrees with recipe {recipe_name}, which trains with "
                         f"model.{field} {shown}: drop one of them (or --set model.{field}={choice})")


def check_init(init: str | None) -> None:
    """Stage 2 starts from a stage-1 run: a missing local one is named before any model loads."""
    if not init:
        raise Blip2Error("stage 2 starts from a stage-1 checkpoint: pass --init RUN_DIR (a `blip2 pretrain stage1` "
                         "run) or a stage-1 model name")
    path = Path(init).expanduser()
    in_a_dir = path.parent != Path(".") and path.parent.is_dir()  # runs/x is a path; Salesforce/x a hub id
    local = init.count("/") > 1 or init.startswith((".", "/", "~")) or in_a_dir
    if local and not path.exists():
        raise Blip2Error(f"--init {init}: no such run directory or checkpoint; `blip2 pretrain stage1` writes one "
                         "(runs/<name>/, its latest checkpoint under runs/<name>/latest)")


def _default_name(recipe_name: str) -> str:
    """``tiny/stage1`` -> ``tiny-stage1``; a YAML file -> its stem."""
    return Path(recipe_name).stem if recipe_name.endswith((".yaml", ".yml")) else recipe_name.replace("/", "-")


def _source_missing(source) -> bool:
    """Whether a recipe's data source is absent from this machine (remote shards are not checked)."""
    from ..data.datasets import expand_shards

    if source.kind == "shapes":
        return False
    if source.kind == "caption_json":
        return not Path(source.path).is_file() or not Path(source.image_root).is_dir()
    if "://" in source.path or source.path.startswith("pipe:"):
        return False
    try:
        expand_shards(source.path)
    except Blip2Error:
        return True
    return False


def _how_to_make(path: str) -> str:
    """The commands that make a pretraining directory, from the ``prepare`` recipe that names it."""
    from ..config import read_yaml

    for file in sorted((recipes_root() / "prepare").glob("*.yaml")):
        data = read_yaml(file)
        if data.get("pretraining_dir") == path.rstrip("/") and data.get("pretraining_steps"):
            return f" (make it: {', then '.join(f'`{step}`' for step in data['pretraining_steps'])})"
    return ""


def check_data(recipe_name: str, spec) -> None:
    """Every local source the recipe reads must be there: the missing ones, and how to make them, in one line."""
    missing = [s.path for s in spec.data.sources if _source_missing(s)]
    if missing:
        listed = "; ".join(f"{path}{_how_to_make(path)}" for path in missing)
        raise Blip2Error(f"recipe {recipe_name} reads data that is not here: {listed}; README 'Data preparation' "
                         "has the details (or --set data.sources=... for other data)")


def _run(stage: str, recipe: str | None, choice: str | None, overrides: list[str] | None, out: Path,
         name: str | None, resume: str, init: str | None, overwrite: bool = False) -> None:
    from ..config import load_recipe
    from ..train.recipe import PretrainRecipe

    recipe_name = choose_recipe(stage, recipe, choice)
    spec = load_recipe(PretrainRecipe, recipe_name, overrides or [])
    if spec.stage != stage:
        raise Blip2Error(f"recipe {recipe_name} is a {spec.stage} recipe, not {stage}")
    check_agrees(stage, recipe_name, spec, choice)
    check_data(recipe_name, spec)
    if stage == "stage2":
        check_init(init)
    _train(stage, spec, out / (name or _default_name(recipe_name)), out, resume, init, overwrite)


def _train(stage: str, spec, run_dir: Path, out: Path, resume: str, init: str | None,
           overwrite: bool = False) -> None:
    from ..api import quiet_transformers
    from ..train import build, loop

    quiet_transformers()
    device = loop.init_distributed()
    loop.seed_everything(spec.train.seed + loop.dist.rank())
    start = loop.prepare(run_dir, resume, overwrite)  # lock the run directory, choose the checkpoint
    if stage == "stage1":
        task, ckpt = build.build_stage1(spec)
    else:
        task, ckpt = build.build_stage2(spec, init or "", out)
    last = loop.run(spec, task, ckpt, start, device)
    if loop.dist.rank() == 0 and last is not None:
        print(f"checkpoint: {last}", file=sys.stderr)
        if stage == "stage2" and any(s.kind == "shapes" for s in spec.data.sources):
            from ..data.synthetic import write_samples

            print(f"held-out shapes to try: {write_samples(run_dir, spec.model.image_size)}", file=sys.stderr)


@app.command("stage1")
def stage1(vit: VitOpt = None, recipe: Stage1RecipeOpt = None, set_: SetOpt = None, out: OutOpt = Path("runs"),
           name: NameOpt = None, resume: ResumeOpt = "auto", overwrite: OverwriteOpt = False) -> None:
    """Stage 1: ITC + ITM + ITG with a frozen image encoder.

    \bExamples:
    blip2 pretrain stage1 --vit eva-g
    blip2 pretrain stage1 --recipe tiny --set train.steps=2000 --set optim.lr=5e-4
    deepspeed --num_gpus 8 $(which blip2) pretrain stage1 --vit clip-l
    """
    _run("stage1", recipe, vit, set_, out, name, resume, None, overwrite)


@app.command("stage2")
def stage2(llm: LlmOpt = None, recipe: Stage2RecipeOpt = None, init: Annotated[Optional[str], typer.Option(
               help="Stage-1 run directory or checkpoint to start from.")] = None,
           set_: SetOpt = None, out: OutOpt = Path("runs"), name: NameOpt = None,
           resume: ResumeOpt = "auto", overwrite: OverwriteOpt = False) -> None:
    """Stage 2: language modelling through a frozen LLM, from a stage-1 checkpoint.

    \bExamples:
    blip2 pretrain stage2 --llm flant5-xl --init runs/pretrain-stage1_eva-g
    blip2 pretrain stage2 --recipe tiny --init runs/tiny-stage1
    """
    _run("stage2", recipe, llm, set_, out, name, resume, init, overwrite)
