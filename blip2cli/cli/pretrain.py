"""``blip2 pretrain stage1|stage2``: the two pretraining stages, in one process or under a launcher.

``--vit`` (stage 1) and ``--llm`` (stage 2) pick the paper's recipe ``pretrain/<stage>_<name>``; ``--recipe``
names any other. Parsing and rendering only: ``blip2cli.train.run.pretrain`` checks the data the recipe reads
before a model is built, then trains.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..config import recipes_root
from ..train.checks import DEFAULTS, FLAGS, paper_choices
from .options import RunsOpt, SetOpt, name_option, overwrite_option

if TYPE_CHECKING:
    from ..train.run import Pretrained

app = typer.Typer(help="Pretrain the Q-Former: stage 1 (representation) and stage 2 (generation).",
                  no_args_is_help=True)


def recipe_help(stage: str) -> str:
    names = [f"pretrain/{stage}_{name}" for name in paper_choices(stage)]
    if (recipes_root() / "tiny" / f"{stage}.yaml").exists():
        names.append(f"tiny (tiny/{stage})")
    return (f"Recipe name or YAML file; wins over {FLAGS[stage]}, which must then agree with it. "
            f"Packaged: {', '.join(names)}.")


Stage1RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", help=recipe_help("stage1"))]
Stage2RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", help=recipe_help("stage2"))]
VitOpt = Annotated[Optional[str], typer.Option(
    "--vit", help=f"Frozen image encoder: {', '.join(paper_choices('stage1'))} (the paper's recipe "
                  f"pretrain/stage1_<vit>; default {DEFAULTS['stage1']}).")]
LlmOpt = Annotated[Optional[str], typer.Option(
    "--llm", help=f"Frozen LLM: {', '.join(paper_choices('stage2'))} (the paper's recipe pretrain/stage2_<llm>; "
                  f"default {DEFAULTS['stage2']}).")]
InitOpt = Annotated[Optional[str], typer.Option(help="Stage-1 run directory or checkpoint to start from.")]
NameOpt = name_option("the stage and recipe")
ResumeOpt = Annotated[str, typer.Option(help="auto (continue the run's latest checkpoint), never, or a checkpoint.")]
OverwriteOpt = overwrite_option("checkpoints and metrics")


def show(done: Pretrained | None) -> None:
    """Where the last checkpoint (and any held-out samples) went, on stderr (nothing on other ranks)."""
    if done is None:
        return
    print(f"checkpoint: {done.checkpoint}", file=sys.stderr)
    if done.samples is not None:
        print(f"held-out shapes to try: {done.samples}", file=sys.stderr)


@app.command("stage1")
def stage1(vit: VitOpt = None, recipe: Stage1RecipeOpt = None, set_: SetOpt = None, out: RunsOpt = Path("runs"),
           name: NameOpt = None, resume: ResumeOpt = "auto", overwrite: OverwriteOpt = False) -> None:
    """Stage 1: ITC + ITM + ITG with a frozen image encoder.

    \bExamples:
    blip2 pretrain stage1 --vit eva-g
    blip2 pretrain stage1 --recipe tiny --set train.steps=2000 --set optim.lr=5e-4
    deepspeed --num_gpus 8 $(which blip2) pretrain stage1 --vit clip-l
    """
    from ..train.run import pretrain

    show(pretrain("stage1", recipe, vit, set_, out, name, resume, None, overwrite))


@app.command("stage2")
def stage2(llm: LlmOpt = None, recipe: Stage2RecipeOpt = None, init: InitOpt = None, set_: SetOpt = None,
           out: RunsOpt = Path("runs"), name: NameOpt = None, resume: ResumeOpt = "auto",
           overwrite: OverwriteOpt = False) -> None:
    """Stage 2: language modelling through a frozen LLM, from a stage-1 checkpoint.

    \bExamples:
    blip2 pretrain stage2 --llm flant5-xl --init runs/pretrain-stage1_eva-g
    blip2 pretrain stage2 --recipe tiny --init runs/tiny-stage1
    """
    from ..train.run import pretrain

    show(pretrain("stage2", recipe, llm, set_, out, name, resume, init, overwrite))
