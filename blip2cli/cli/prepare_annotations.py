"""``blip2 prepare vqav2|okvqa|gqa|nocaps|flickr30k`` (and the annotation step of coco and vg): annotation files.

Parsing and rendering only: the registry of files and the fetching live in ``blip2cli.data.annotations``
(imported inside the commands, so that ``blip2 --help`` does not load torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import JsonOpt, emit

AnnOutOpt = Annotated[Optional[Path], typer.Option(
    "--out", help="Directory for the files and MANIFEST.json (default: data/<dataset>/annotations).")]
SplitOpt = Annotated[Optional[list[str]], typer.Option(
    "--split", help="Only files of this split or role (train, val, test, test-dev, references, ...); repeatable.")]
FromOpt = Annotated[Optional[Path], typer.Option(
    "--from", help="A directory of hand-downloaded files, searched recursively by name before downloading.")]


def run_annotations(dataset: str, out: Path | None, splits: list[str] | None, source: Path | None,
                    json_out: bool) -> None:
    """Prepare the annotation files of ``dataset`` and report them (JSON on stdout, or a table and eval hints)."""
    from ..data.annotations import prepare_record

    emit(prepare_record(dataset, out, splits, source), json_out, render_record)


def render_record(record: dict) -> None:
    """The files as a table on stderr, then the eval command lines on stdout."""
    _render(record["dataset"], record["out"], record["files"])
    for line in record["eval"]:
        print(line)


def _render(dataset: str, out: str, files: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("file", "split", "role", "size", "", box=None, title=f"{dataset} annotations in {out}",
                  title_justify="left")
    for f in files:
        table.add_row(f["name"], f["split"], f["role"], _size(f["size"]), f["action"])
    Console(stderr=True).print(table)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KB", "MB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def vqav2(out: AnnOutOpt = None, split: SplitOpt = None, source: FromOpt = None, json_out: JsonOpt = False) -> None:
    """VQAv2: LAVIS's training and val lists, answer list, official val questions/annotations, test-dev questions."""
    run_annotations("vqav2", out, split, source, json_out)


def okvqa(out: AnnOutOpt = None, split: SplitOpt = None, source: FromOpt = None, json_out: JsonOpt = False) -> None:
    """OK-VQA: LAVIS's training and val lists, answer list, and the official val questions and annotations."""
    run_annotations("okvqa", out, split, source, json_out)


def gqa(out: AnnOutOpt = None, split: SplitOpt = None, source: FromOpt = None, json_out: JsonOpt = False) -> None:
    """GQA: balanced train, test-dev and test questions."""
    run_annotations("gqa", out, split, source, json_out)


def nocaps(out: AnnOutOpt = None, split: SplitOpt = None, source: FromOpt = None, json_out: JsonOpt = False) -> None:
    """NoCaps: LAVIS's val and test image lists and the official val reference captions."""
    run_annotations("nocaps", out, split, source, json_out)


def flickr30k(out: AnnOutOpt = None, split: SplitOpt = None, source: FromOpt = None,
              json_out: JsonOpt = False) -> None:
    """Flickr30K: LAVIS's Karpathy train, val and 1K test splits (retrieval)."""
    run_annotations("flickr30k", out, split, source, json_out)
