"""The ``blip2`` command: a Typer app with one thin module per command group."""

from __future__ import annotations

import os
import sys

import typer

from ..errors import Blip2Error
from . import generate, models, pretrain

app = typer.Typer(
    name="blip2",
    help="BLIP-2 end to end: generate, evaluate, pretrain, fine-tune and prepare data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("generate", no_args_is_help=True)(generate.generate)
app.command("models")(models.list_models)
app.command("convert", no_args_is_help=True)(models.convert)
app.add_typer(pretrain.app, name="pretrain")


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main() -> None:
    """Entry point: every expected failure is one line on stderr and a non-zero exit."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        app()
    except Blip2Error as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:  # a bug, not bad input: one line unless asked for the traceback
        if os.environ.get("BLIP2_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        fail(f"internal error: {type(e).__name__}: {first} (set BLIP2_DEBUG=1 for the traceback)", code=1)
