"""``blip2 models`` (what names exist and where they come from) and ``blip2 convert``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..runtime.errors import Blip2Error
from .options import JsonLinesOpt, LavisLlmOpt


def list_models(
    json_out: JsonLinesOpt = False,
) -> None:
    """List the model names blip2 knows, with where each one's weights come from."""
    from ..models.registry import ENTRIES

    if json_out:
        for e in ENTRIES:
            sys.stdout.write(json.dumps({"name": e.name, "kind": e.kind, "source": e.source,
                                         "description": e.description}) + "\n")
        return
    if not sys.stdout.isatty():  # piped: whole names, one tab-separated line each (rich would cut them to 80 columns)
        for e in ENTRIES:
            sys.stdout.write(f"{e.name}\t{e.kind}\t{e.source}\t{e.description}\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "kind", "source", "description", box=None)
    for e in ENTRIES:
        table.add_row(e.name, e.kind, e.source, e.description)
    Console().print(table)


def convert(
    model: Annotated[str, typer.Argument(help="Any model blip2 loads (name, hub id, directory, LAVIS .pth).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (replaced atomically).")],
    to: Annotated[str, typer.Option(help="hf: a transformers BLIP-2 directory; blip2: our own format.")] = "hf",
    llm: LavisLlmOpt = None,
    push_to_hub: Annotated[Optional[str], typer.Option(
        "--push-to-hub", metavar="REPO", help="Then upload the directory to this Hugging Face model repository "
                                              "(created if missing).")] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to-hub: create the repository private."
                                          )] = False,
) -> None:
    """Convert a model to a transformers BLIP-2 directory or to blip2's own format, with a model card (README.md).

    \bExamples:
    blip2 convert blip2_pretrained_opt2.7b.pth --llm opt-2.7b --out exported/ --to hf
    blip2 convert runs/tiny-stage2/latest --out tiny-hf/
    blip2 convert runs/caption-coco/latest --out coco-hf/ --push-to-hub me/blip2-coco --private
    """
    from ..runtime.progress import quiet_transformers
    from ..models.formats import card
    from ..models.hub import is_hub_id
    from ..models.resolve import load_checkpoint
    from ..runtime import __version__

    if to not in ("hf", "blip2"):
        raise Blip2Error(f"--to {to!r}: expected hf or blip2")
    if push_to_hub is not None and not is_hub_id(push_to_hub):
        raise Blip2Error(f"--push-to-hub {push_to_hub!r}: expected a hub repository id, OWNER/NAME")
    if private and push_to_hub is None:
        raise Blip2Error("--private applies to the repository --push-to-hub creates: give --push-to-hub REPO")
    _check_out_apart(model, out)
    quiet_transformers()
    ckpt = load_checkpoint(model, llm=llm)
    card.export(ckpt, out, to, card.model_card(ckpt, model, out, to, push_to_hub))
    print(f"wrote {out}", file=sys.stderr)
    if push_to_hub is not None:
        card.push(out, push_to_hub, private, f"Upload {model} converted by blip2 {__version__} (--to {to})")


def _check_out_apart(model: str, out: Path) -> None:
    """``--out`` is replaced as a whole: it must not be, hold, or lie inside the model being read."""
    source = Path(model).expanduser()
    if not source.exists():
        return  # a registry name or hub id
    source, target = source.resolve(), out.expanduser().resolve()
    if target == source or source.is_relative_to(target) or target.is_relative_to(source):
        raise Blip2Error(f"--out {out} overlaps the model {model} ({source}): writing it would replace what is being "
                         "read; choose a directory outside it")
