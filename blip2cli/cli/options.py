"""Command-line options that several commands share, spelled and explained once, and the one way a command
prints its result (``--json`` or rendered)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object on stdout, nothing else.")]
JsonLinesOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line on stdout, nothing else.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe value: a.b=c (repeatable).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N (under a launcher: each rank's GPU).")]
DtypeOpt = Annotated[str, typer.Option(
    help="auto (bfloat16 on a GPU that has it, else float16; float32 on CPU), float32, bfloat16, float16.")]
LavisLlmOpt = Annotated[Optional[str], typer.Option(
    help="The LLM of a LAVIS stage-2 .pth (registry name, hub id or directory).")]
RunsOpt = Annotated[Path, typer.Option(help="Directory that holds the runs: each in <out>/<name>/.")]


class BeamScoring(str, Enum):
    transformers = "transformers"
    lavis = "lavis"


BeamScoringOpt = Annotated[Optional[BeamScoring], typer.Option(
    help="How beam search ranks finished texts: transformers (5.x, the default of generate) or lavis "
         "(transformers 4.33 under LAVIS: the paper's numbers; min lengths count the prompt).")]


def recipe_option(default: str):
    """``--recipe``: a recipe name or YAML path, defaulting to ``default``."""
    return Annotated[Optional[str], typer.Option(help=f"Recipe name or YAML path (default: {default}).")]


def name_option(default: str):
    """``--name``: the run directory under ``--out``, defaulting to what ``default`` says."""
    return Annotated[Optional[str], typer.Option(help=f"Run name: its directory under --out (default: {default}).")]


def overwrite_option(work: str):
    """``--overwrite``: discard the run directory's earlier ``work`` and start again."""
    return Annotated[bool, typer.Option("--overwrite", help=f"Start over: discard the run directory's {work}.")]


def emit(result: dict[str, Any], json_out: bool, render: Callable[[dict[str, Any]], None], *,
         ensure_ascii: bool = True) -> None:
    """Show a command's result: its ``notes`` on stderr, then the result as one JSON line on stdout (``--json``)
    or as ``render`` shows it."""
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if json_out:
        sys.stdout.write(json.dumps(result, ensure_ascii=ensure_ascii) + "\n")
    else:
        render(result)
    sys.stdout.flush()
