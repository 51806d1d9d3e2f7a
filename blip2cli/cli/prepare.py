"""``blip2 prepare``: web datasets to webdataset shards, CapFilt captions, annotation files.

No ``from __future__ import annotations`` here: the option help texts of the per-source commands are built
from closure variables, which Typer could not resolve from postponed annotations.
"""

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import prepare_annotations
from .options import DeviceOpt, DtypeOpt, JsonOpt, SetOpt, emit, recipe_option

app = typer.Typer(help="Prepare data: download image-text datasets to webdataset shards, caption them with "
                       "CapFilt, fetch the benchmarks' annotation files.", no_args_is_help=True)

SubsetOpt = Annotated[Optional[str], typer.Option(
    help="Download a reproducible random sample of this many rows (115m, 500k, 20000).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the --subset draw.")]
ProcessesOpt = Annotated[Optional[int], typer.Option(min=1, help="Download processes (default: the recipe's).")]
ThreadsOpt = Annotated[Optional[int], typer.Option(min=1, help="Download threads per process.")]
DistributorOpt = Annotated[Optional[str], typer.Option(
    help="img2dataset distributor: multiprocessing (one node), pyspark or ray (many nodes).")]
RecipeOpt = recipe_option("prepare/<source>")
CapFiltRecipeOpt = recipe_option("prepare/capfilt")


def _recipe(cls: type, name: str, overrides: list[str] | None, **options: Any):
    """Recipe ``name`` with ``--set`` overrides, then the command's own options where they were given."""
    from ..config import load_recipe

    spec = load_recipe(cls, name, overrides or [])
    for key, value in options.items():
        if value is not None:
            setattr(spec, key, value)
    return spec


def _download_recipe(source: str, recipe: str | None, overrides: list[str] | None, **options: Any):
    from ..data.download import DownloadRecipe

    return _recipe(DownloadRecipe, recipe or f"prepare/{source}", overrides, **options)


def _render_download(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("", "images", box=None, title=f"{summary['out']}: {summary['shards']} shards", title_justify="left")
    table.add_row("rows", str(summary["rows"]))
    table.add_row("written", f"{summary['successes']} ({100 * summary['success_rate']:.1f}%)")
    table.add_row("failed to download", str(summary["failed_to_download"]))
    table.add_row("failed to decode or resize", str(summary["failed_to_resize"]))
    console = Console(stderr=True)
    console.print(table)
    for failure in summary["top_failures"]:
        console.print(f"  {failure['count']:>8}  {failure['reason']}", markup=False, highlight=False)


def _default_out(source: str, subset: str | None) -> Path:
    """``data/<source>``, or with ``--subset 115m`` ``data/<source>115m``: the directories the recipes read."""
    return Path("data") / f"{source}{subset.strip().lower() if subset else ''}"


def _web_source(source: str, about: str):
    def command(
        input: Annotated[Optional[list[str]], typer.Option(
            "--input", help="Metadata: files, globs or directories (parquet, csv, tsv as the recipe says); "
                            "repeatable (default: the recipe's metadata_dir, e.g. data/laion400m-meta).")] = None,
        out: Annotated[Optional[Path], typer.Option(
            help=f"Output directory (default: data/{source}, or data/{source}<SUBSET> with --subset).")] = None,
        subset: SubsetOpt = None,
        seed: SeedOpt = 0,
        processes: ProcessesOpt = None,
        threads: ThreadsOpt = None,
        distributor: DistributorOpt = None,
        recipe: RecipeOpt = None,
        set_: SetOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        from ..data.download import default_input, parse_count, prepare_download

        spec = _download_recipe(source, recipe, set_, processes=processes, threads=threads, distributor=distributor)
        count = parse_count(subset) if subset else None
        summary = prepare_download(input or default_input(source, spec), out or _default_out(source, subset), spec,
                                   count, seed)
        emit(summary, json_out, _render_download)

    command.__doc__ = f"Download {about} into webdataset shards (img2dataset); a rerun skips finished shards."
    return command


for _name, _about in [("laion", "LAION-400M (the paper: a 115M subset, --subset 115m)"),
                      ("cc3m", "Conceptual Captions 3M"), ("cc12m", "Conceptual 12M"), ("sbu", "SBU Captions")]:
    app.command(_name)(_web_source(_name, _about))


def _annotated_source(source: str, about: str, train_file: str):
    def command(
        out: Annotated[Optional[Path], typer.Option(
            help=f"Output directory (default: data/{source}): annotations/ and, with --shards, shards/.")] = None,
        split: Annotated[Optional[list[str]], typer.Option(
            "--split", help="Only these annotation splits (repeatable; default: all).")] = None,
        source_dir: Annotated[Optional[Path], typer.Option(
            "--from", help="A directory holding annotation files downloaded by hand.")] = None,
        shards: Annotated[bool, typer.Option(
            "--shards", help="Also write the training images and captions as webdataset shards.")] = False,
        images: Annotated[Optional[str], typer.Option(
            help="Where the annotation's image paths point: a local directory or a URL prefix.")] = None,
        subset: SubsetOpt = None,
        seed: SeedOpt = 0,
        processes: ProcessesOpt = None,
        threads: ThreadsOpt = None,
        recipe: RecipeOpt = None,
        set_: SetOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        from ..data.download import parse_count, prepare_download
        from ..data.annotations import prepare_record

        root = out or Path("data") / source
        splits = list(split or [])
        if shards and splits and "train" not in splits:
            splits.append("train")
        result = prepare_record(source, root / "annotations", splits or None, source_dir)
        if shards:
            spec = _download_recipe(source, recipe, set_, processes=processes, threads=threads, images=images)
            result["shards"] = prepare_download([str(root / "annotations" / train_file)], root / "shards", spec,
                                                parse_count(subset) if subset else None, seed)
        emit(result, json_out, _render_annotated)

    command.__doc__ = (f"Fetch (or find with --from) the {about} annotation files; with --shards, also download "
                       "its training images into webdataset shards for pretraining.")
    return command


def _render_annotated(result: dict) -> None:
    from .prepare_annotations import render_record

    render_record(result)
    if "shards" in result:
        _render_download(result["shards"])


app.command("coco")(_annotated_source("coco", "COCO (Karpathy splits)", "coco_karpathy_train.json"))
app.command("vg")(_annotated_source("vg", "Visual Genome caption", "vg_caption.json"))
for _command in (prepare_annotations.vqav2, prepare_annotations.okvqa, prepare_annotations.gqa,
                 prepare_annotations.nocaps, prepare_annotations.flickr30k):
    app.command(_command.__name__)(_command)


@app.command("capfilt", no_args_is_help=True)
def capfilt(
    shards: Annotated[list[str], typer.Argument(
        help="Input shards: .tar files, directories, globs or brace patterns.")],
    out: Annotated[Path, typer.Option(help="Output directory: one shard per input shard, same name.")],
    recipe: CapFiltRecipeOpt = None,
    set_: SetOpt = None,
    captioner: Annotated[Optional[str], typer.Option(help="Captioner: registry name, hub id or directory.")] = None,
    ranker: Annotated[Optional[str], typer.Option(help="CLIP ranker: registry name, hub id, directory or "
                                                      "open_clip MODEL/TAG.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Images per batch.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed (default: the recipe's).")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Caption web images with CapFilt: BLIP samples captions, CLIP keeps the best two (with the web caption
    as a candidate). Sharded over ranks under torchrun; finished shards are skipped on a rerun."""
    from ..data.capfilt import CapFiltRecipe, capfilt

    spec = _recipe(CapFiltRecipe, recipe or "prepare/capfilt", set_, captioner=captioner, ranker=ranker,
                   batch_size=batch_size, seed=seed)
    done = capfilt(shards, out, spec, device, dtype, on_shard=_log_shard)
    if done.summary is not None:
        emit(done.summary, json_out, _render_capfilt)
    done.check()


def _log_shard(stats: dict) -> None:
    if "error" in stats:
        print(f"capfilt: skipped {stats['error']}", file=sys.stderr)
        return
    print(f"capfilt: {stats['shard']}: {stats['captioned']}/{stats['samples']} captioned in {stats['seconds']:.1f} s",
          file=sys.stderr)


def _render_capfilt(summary: dict) -> None:
    from rich.console import Console

    rate = summary["images_per_second"]
    Console(stderr=True).print(
        f"{summary['out']}: {summary['captioned']} images captioned in {summary['shards']} shards "
        f"({summary['unreadable']} unreadable skipped); web caption kept for {summary['web_caption_kept']}; "
        f"{rate if rate is not None else '-'} images/s", highlight=False)
