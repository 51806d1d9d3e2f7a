"""Command-line options that several commands share, spelled and explained once."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object on stdout, nothing else.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe value: a.b=c (repeatable).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N (under a launcher: each rank's GPU).")]
