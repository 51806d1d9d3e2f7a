"""``blip2 pretrain stage1|stage2``: the two pretraining stages, in one process or under a launcher."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import SetOpt

app = typer.Typer(help="Pretrain the Q-Former: stage 1 (representation) and stage 2 (generation).",
                  no_args_is_help=True)

RecipeOpt = Annotated[str, typer.Option(help="Recipe name (pretrain/stage1_eva-g, tiny/stage1) or YAML file.")]
OutOpt = Annotated[Path, typer.Option(help="Directory that holds the runs.")]
NameOpt = Annotated[Optional[str], typer.Option(help="Run name (default: the stage and recipe).")]
ResumeOpt = Annotated[str, typer.Option(help="auto (continue the run's latest checkpoint), never, or a checkpoint.")]


def _recipe_name(recipe: str, stage: str) -> str:
    """``--recipe tiny`` is short for ``tiny/<stage>``."""
    from ..config import recipes_root

    if (recipes_root() / recipe / f"{stage}.yaml").exists():
        return f"{recipe}/{stage}"
    return recipe


def _default_name(recipe_name: str) -> str:
    """``tiny/stage1`` -> ``tiny-stage1``; a YAML file -> its stem."""
    return Path(recipe_name).stem if recipe_name.endswith((".yaml", ".yml")) else recipe_name.replace("/", "-")


def _run(stage: str, recipe: str, overrides: list[str] | None, out: Path, name: str | None, resume: str,
         init: str | None) -> None:
    from ..api import quiet_transformers
    from ..config import load_recipe
    from ..errors import Blip2Error
    from ..train import build, loop
    from ..train.recipe import PretrainRecipe

    quiet_transformers()
    recipe_name = _recipe_name(recipe, stage)
    spec = load_recipe(PretrainRecipe, recipe_name, overrides or [])
    if spec.stage != stage:
        raise Blip2Error(f"recipe {recipe_name} is a {spec.stage} recipe, not {stage}")
    device = loop.init_distributed()
    loop.seed_everything(spec.train.seed + loop.dist.rank())
    run_dir = out / (name or _default_name(recipe_name))
    if stage == "stage1":
        task, ckpt = build.build_stage1(spec)
    else:
        task, ckpt = build.build_stage2(spec, init or "", out)
    last = loop.run(spec, task, ckpt, run_dir, resume, device)
    if loop.dist.rank() == 0 and last is not None:
        print(f"checkpoint: {last}", file=sys.stderr)


@app.command("stage1")
def stage1(recipe: RecipeOpt = "pretrain/stage1_eva-g", set_: SetOpt = None, out: OutOpt = Path("runs"),
           name: NameOpt = None, resume: ResumeOpt = "auto") -> None:
    """Stage 1: ITC + ITM + ITG with a frozen image encoder."""
    _run("stage1", recipe, set_, out, name, resume, None)


@app.command("stage2")
def stage2(recipe: RecipeOpt = "pretrain/stage2_opt-2.7b", init: Annotated[Optional[str], typer.Option(
               help="Stage-1 run directory or checkpoint to start from.")] = None,
           set_: SetOpt = None, out: OutOpt = Path("runs"), name: NameOpt = None,
           resume: ResumeOpt = "auto") -> None:
    """Stage 2: language modelling through a frozen LLM, from a stage-1 checkpoint."""
    _run("stage2", recipe, set_, out, name, resume, init)
