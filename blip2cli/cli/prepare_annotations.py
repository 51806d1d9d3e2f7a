"""``blip2 prepare vqav2|okvqa|gqa|nocaps|flickr30k`` (and the annotation step of coco and vg): annotation files.

Parsing and rendering only: the registry of files and the fetching live in ``blip2cli.data.annotations``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import JsonOpt

AnnOutOpt = Annotated[Optional[Path], typer.Option(
    "--out", help="Directory for the files and MANIFEST.json (default: data/<dataset>/annotations).")]
SplitOpt = Annotated[Optional[list[str]], typer.Option(
    "--split", help="Only files of this split or role (train, val, test, test-dev, references, ...); repeatable.")]
FromOpt = Annotated[Optional[Path], typer.Option(
    "--from", help="A directory of hand-downloaded files, searched recursively by name before downloading.")]


def run_annotations(dataset: str, out: Path | None, splits: list[str] | None, source: Path | None,
                    json_out: bool) -> None:
    """Prepare the annotation files of ``dataset`` and report them (JSON on stdout, or a table and eval hints)."""
    record = prepare_record(dataset, out, splits, source)
    if json_out:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()
    else:
        render_record(record)


def prepare_record(dataset: str, out: Path | None, splits: list[str] | None, source: Path | None) -> dict:
    """Prepare the files; what was done, as plain data: files (path, size, md5, action) and eval hints."""
    from ..data.annotations import eval_hint, prepare_annotations

    out = out if out is not None else Path("data") / dataset / "annotations"
    prepared = prepare_annotations(dataset, out, splits=splits or None, source_dir=source)
    files = [{"name": p.name, "path": str(p.path), "url": p.url, "size": p.size, "md5": p.md5, "split": p.split,
              "role": p.role, "action": p.action} for p in prepared]
    return {"dataset": dataset, "out": str(out), "files": files,
            "eval": eval_hint(dataset, out, available={p.name for p in prepared})}


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
