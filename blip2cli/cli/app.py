"""The ``blip2`` command: a Typer app with one thin module per command group."""

from __future__ import annotations

import os
import sys

from typing import Annotated

import typer

try:  # typer >= 0.2x carries its own copy of click; its usage errors are that copy's classes
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer on the real click
    import click

from ..runtime.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, Blip2Error
from . import eval as eval_cmd
from . import finetune, generate, models, prepare, pretrain

app = typer.Typer(
    name="blip2",
    help="BLIP-2 end to end: generate, evaluate, pretrain, fine-tune and prepare data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from ..runtime import __version__

        print(f"blip2 {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                               help="Print the version and exit.")] = False) -> None:
    """BLIP-2 end to end: generate, evaluate, pretrain, fine-tune and prepare data."""


app.command("generate", no_args_is_help=True)(generate.generate)
app.command("models")(models.list_models)
app.command("convert", no_args_is_help=True)(models.convert)
app.add_typer(pretrain.app, name="pretrain")
app.add_typer(finetune.app, name="finetune")
app.add_typer(eval_cmd.app, name="eval")
app.add_typer(prepare.app, name="prepare")


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print ``error: message`` (nothing when the message is empty: it was reported already) and exit."""
    if message:
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def take_local_rank(argv: list[str]) -> list[str]:
    """Remove the ``--local_rank`` argument the DeepSpeed launcher appends (LOCAL_RANK carries it too)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name, _, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not value and i + 1 < len(argv):
                value, skip = argv[i + 1], True
            os.environ.setdefault("LOCAL_RANK", value)
            continue
        out.append(arg)
    return out


def main() -> None:
    """Entry point: every expected failure is one line on stderr and a non-zero exit."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    sys.argv = take_local_rank(sys.argv)
    try:
        code = app(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else "", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except click.exceptions.UsageError as e:
        fail(usage_line(e), EXIT_BAD_INPUT)
    except click.exceptions.ClickException as e:
        fail(e.format_message(), EXIT_BAD_INPUT)
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Blip2Error as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:  # a bug, not bad input: one line unless asked for the traceback
        if os.environ.get("BLIP2_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        fail(f"internal error: {type(e).__name__}: {first} (set BLIP2_DEBUG=1 for the traceback)", EXIT_INTERNAL)
    if isinstance(code, int) and code:
        raise SystemExit(code)


def usage_line(e: click.exceptions.UsageError) -> str:
    """click's usage error as one line that names the command's help."""
    message = " ".join(e.format_message().split())
    command = e.ctx.command_path if e.ctx else "blip2"
    return f"{message} (see '{command} --help')"
