"""``blip2 finetune caption``: fine-tuning a stage-2 model, in one process or under a launcher.

Parsing and rendering only: ``blip2cli.train.run.finetune`` checks the data the recipe reads and the ``--init``
model before anything is built, then trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import LavisLlmOpt, RunsOpt, SetOpt, name_option, overwrite_option
from .pretrain import ResumeOpt, show

app = typer.Typer(help="Fine-tune a pretrained model: COCO captioning (the paper's protocol), with the ViT trained.",
                  no_args_is_help=True)

CaptionRecipeOpt = Annotated[Optional[str], typer.Option(
    "--recipe", help="Recipe name or YAML file (default finetune/caption_coco_opt-2.7b; tiny: tiny/caption).")]
CaptionInitOpt = Annotated[Optional[str], typer.Option(
    help="The stage-2 model to start from: a registry name (blip2-opt-2.7b), a LAVIS stage-2 .pth (with --llm) "
         "or a run directory (runs/<stage2 run>/latest).")]


NameOpt = name_option("the recipe")
OverwriteOpt = overwrite_option("checkpoints and metrics")


@app.command("caption")
def caption(init: CaptionInitOpt = None, recipe: CaptionRecipeOpt = None, llm: LavisLlmOpt = None,
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
