"""``blip2 finetune caption|vqa|retrieval``: the paper's fine-tuning protocols, in one process or under a launcher.

Parsing and rendering only: ``blip2cli.train.run.finetune`` checks the data the recipe reads and the ``--init``
model before anything is built, then trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import LavisLlmOpt, RunsOpt, SetOpt, name_option, overwrite_option
from .pretrain import ResumeOpt, show

app = typer.Typer(help="Fine-tune a pretrained model with the paper's protocols (the ViT trained): COCO captioning, "
                       "VQAv2 with Visual Genome QA, COCO retrieval.", no_args_is_help=True)


def recipe_option(task: str) -> object:
    return Annotated[Optional[str], typer.Option(
        "--recipe", help=f"Recipe name or YAML file (default: the paper's recipes/finetune/{task}_* for the --init "
                         f"model; tiny: tiny/{task}).")]


Stage2InitOpt = Annotated[Optional[str], typer.Option(
    help="The stage-2 model to start from: a registry name (blip2-opt-2.7b), a LAVIS stage-2 .pth (with --llm) "
         "or a run directory (runs/<stage2 run>/latest).")]
Stage1InitOpt = Annotated[Optional[str], typer.Option(
    help="The stage-1 model to start from: a registry name (lavis-stage1-vit-g), a LAVIS stage-1 .pth or a run "
         "directory (runs/<stage1 run>/latest).")]


NameOpt = name_option("the recipe")
OverwriteOpt = overwrite_option("checkpoints and metrics")


@app.command("caption")
def caption(init: Stage2InitOpt = None, recipe: recipe_option("caption") = None, llm: LavisLlmOpt = None,
            set_: SetOpt = None, out: RunsOpt = Path("runs"), name: NameOpt = None, resume: ResumeOpt = "auto",
            overwrite: OverwriteOpt = False) -> None:
    """COCO captioning: the Q-Former, ``ln_vision`` and the ViT trained, the LLM frozen, the prompt never a target.

    \bExamples:
    blip2 finetune caption --init blip2-opt-2.7b
    blip2 finetune caption --recipe tiny --init runs/tiny-stage2/latest
    deepspeed --num_gpus 8 $(which blip2) finetune caption --init runs/pretrain-stage2_opt-2.7b/latest
    """
    from ..train.run import finetune

    show(finetune("caption", recipe, set_, out, name, resume, init, llm, overwrite))


@app.command("vqa")
def vqa(init: Stage2InitOpt = None, recipe: recipe_option("vqa") = None, llm: LavisLlmOpt = None,
        set_: SetOpt = None, out: RunsOpt = Path("runs"), name: NameOpt = None, resume: ResumeOpt = "auto",
        overwrite: OverwriteOpt = False) -> None:
    """VQAv2 (train and val) with Visual Genome QA: the question read by the Q-Former and the LLM, the answers the
    targets, weighted by their share of the annotators' answers; the ViT trained, the LLM frozen.

    The Q-Former's text side comes from the stage-1 model named by the recipe's model.qformer_text_init.

    \bExamples:
    blip2 finetune vqa --init blip2-opt-2.7b
    blip2 finetune vqa --recipe tiny --init runs/tiny-stage2/latest
    blip2 finetune vqa --recipe tiny --init runs/tiny-stage2/latest --set model.question_in_qformer=false
    """
    from ..train.run import finetune

    show(finetune("vqa", recipe, set_, out, name, resume, init, llm, overwrite))


@app.command("retrieval")
def retrieval(init: Stage1InitOpt = None, recipe: recipe_option("retrieval") = None, set_: SetOpt = None,
              out: RunsOpt = Path("runs"), name: NameOpt = None, resume: ResumeOpt = "auto",
              overwrite: OverwriteOpt = False) -> None:
    """COCO retrieval: ITC, ITM and ITG on a stage-1 model, the captions of an image all its positives, the ViT
    trained.

    \bExamples:
    blip2 finetune retrieval --init lavis-stage1-vit-g
    blip2 finetune retrieval --recipe tiny --init runs/tiny-stage1/latest
    """
    from ..train.run import finetune

    show(finetune("retrieval", recipe, set_, out, name, resume, init, None, overwrite))
