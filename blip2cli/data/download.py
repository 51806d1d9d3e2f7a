"""Web-scale download: a URL/caption list (parquet, csv, tsv, or a LAVIS caption list) to webdataset
shards through img2dataset, with a reproducible subset, resumable shards and a failure summary.

The work directory layout (``OUT``):

- ``00000.tar`` ... : img2dataset's shards (``jpg`` image, ``txt`` caption, ``json`` metadata), with its
  ``NNNNN_stats.json`` and ``NNNNN.parquet`` beside each; a shard with a stats file is finished.
- ``_prepare/input/part-NNNNN.parquet``: the normalised (and sampled) URL list, written once.
- ``_prepare/input.json``: what the list was made from (inputs, subset, seed), checked on every rerun.
- ``_prepare/summary.json``: the totals of the last run.

Nothing of ours sits at the top level as ``*.json``: img2dataset reads every top-level ``*.json`` as the
stats file of a finished shard.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runtime.errors import Blip2Error
from ..runtime.extras import require_extra
from ..images import MAX_PIXELS
from ..runtime.io import atomic_write_text, read_json

INPUT_FORMATS = ("parquet", "csv", "tsv", "json")
URL, CAPTION = "url", "caption"  # the columns of the normalised URL list that img2dataset reads
_SUFFIXES = {"parquet": (".parquet",), "csv": (".csv", ".csv.gz"), "tsv": (".tsv", ".tsv.gz"), "json": (".json",)}


@dataclass
class DownloadRecipe:
    """How one source's metadata reads and how its images are stored (``recipes/prepare/*.yaml``).

    A field left unset (``None``) is img2dataset's own default, or, for the columns and the header, what the list
    needs to name nothing: columns already called ``url`` and ``caption``, a header row unless ``columns`` names them.
    """

    input_format: str | None = None  # parquet | csv | tsv | json (a LAVIS list of {image, caption})
    header: bool | None = None  # csv/tsv: the first row names the columns (unset: unless `columns` names them)
    columns: list[str] = field(default_factory=list)  # csv/tsv without a header: the column names
    url_col: str | None = None  # the URL column (unset: url)
    caption_col: str | None = None  # the caption column (unset: caption)
    extra_columns: list[str] = field(default_factory=list)  # copied into each sample's json
    image_size: int | None = None  # pixels (img2dataset's resize target)
    resize_mode: str = "keep_ratio"  # img2dataset: no | border | keep_ratio | keep_ratio_largest | center_crop
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_image_area: float = float(MAX_PIXELS)  # pixels; larger images are refused (counted, not written)
    max_aspect_ratio: float = 1e9
    samples_per_shard: int = 10000
    timeout: int = 10  # seconds per request
    retries: int = 0
    processes: int | None = None  # download processes
    threads: int | None = None  # download threads per process
    distributor: str = "multiprocessing"  # multiprocessing (one node) | pyspark | ray (many nodes)
    images: str = ""  # json input: where image paths are relative to (a URL prefix or a local directory)
    # without --input: the directory the metadata is read from, and where to get it (said when it is empty)
    metadata_dir: str = ""
    metadata_source: str = ""
    # the directory the pretraining recipes read from this source, and the commands that make it
    pretraining_dir: str = ""
    pretraining_steps: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise Blip2Error(f"input_format {self.input_format!r}: expected one of {', '.join(INPUT_FORMATS)}")
        if self.input_format in ("csv", "tsv") and not self.has_header() and not self.columns:
            raise Blip2Error(f"a {self.input_format} without a header needs `columns` (the column names)")

    def has_header(self) -> bool:
        """Whether a csv/tsv list's first row names its columns."""
        return self.header if self.header is not None else not self.columns

    @property
    def url_column(self) -> str:
        return self.url_col or URL

    @property
    def caption_column(self) -> str:
        return self.caption_col or CAPTION

    def img2dataset_options(self) -> dict[str, Any]:
        """What the recipe sets of img2dataset's sizes and workers (the rest is img2dataset's default)."""
        chosen = {"image_size": self.image_size, "processes_count": self.processes, "thread_count": self.threads}
        return {k: v for k, v in chosen.items() if v is not None}


# --- the URL list ----------------------------------------------------------------------------------


def parse_count(text: str) -> int:
    """``115m`` -> 115000000, ``10k`` -> 10000, ``2.5M`` -> 2500000, ``1000`` -> 1000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmbKMB]?)\s*", text)
    if match is None:
        raise Blip2Error(f"--subset {text!r}: expected a count such as 115m, 500k or 20000")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[match.group(2).lower()]
    count = round(float(match.group(1)) * scale)
    if count <= 0:
        raise Blip2Error(f"--subset {text!r}: must be positive")
    return count


def default_input(source: str, recipe: DownloadRecipe) -> list[str]:
    """Without ``--input``: the recipe's metadata directory, which must hold files of its format."""
    recipe.check()
    if not recipe.metadata_dir:
        raise Blip2Error(f"prepare {source}: give --input, the dataset's URL and caption list")
    where = Path(recipe.metadata_dir)
    suffixes = _SUFFIXES[recipe.input_format]
    if not where.is_dir() or not any(p.name.endswith(suffixes) for p in where.iterdir()):
        raise Blip2Error(f"prepare {source}: no {recipe.input_format} metadata in {where}/; put "
                         f"{recipe.metadata_source} there (or give --input FILES)")
    return [str(where)]


def input_files(inputs: list[str], recipe: DownloadRecipe) -> list[Path]:
    """The metadata files: paths, globs, or directories (every file of the recipe's format in them)."""
    suffixes = _SUFFIXES[recipe.input_format]
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.name.endswith(suffixes))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(str(path)))
        if not found:
            raise Blip2Error(f"--input {item}: no {recipe.input_format} file there")
        files.extend(found)
    return files


def _read_table(path: Path, recipe: DownloadRecipe):
    """One metadata file as a pyarrow table with ``url``, ``caption`` and the extra columns."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    wanted = [recipe.url_column, recipe.caption_column, *_kept_columns(recipe)]
    try:
        if recipe.input_format == "json":
            table = _caption_list_table(path, recipe)
            _check_columns(path, recipe, table.column_names)
        elif recipe.input_format == "parquet":
            present = pq.read_schema(path).names
            _check_columns(path, recipe, present)
            table = pq.read_table(path, columns=[c for c in wanted if c in present])
        else:
            read = pacsv.ReadOptions(column_names=None if recipe.has_header() else recipe.columns)
            parse = pacsv.ParseOptions(delimiter="\t" if recipe.input_format == "tsv" else ",",
                                       quote_char=False if recipe.input_format == "tsv" else '"',
                                       newlines_in_values=False)
            with pacsv.open_csv(path, read_options=read, parse_options=parse) as reader:
                present = reader.schema.names
            _check_columns(path, recipe, present)
            kept = [c for c in wanted if c in present]
            convert = pacsv.ConvertOptions(include_columns=kept, column_types={c: pa.string() for c in kept})
            table = pacsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except (OSError, pa.ArrowInvalid, ValueError) as e:
        raise Blip2Error(f"{path}: cannot read it as {recipe.input_format} ({str(e).splitlines()[0]})") from None
    names = {recipe.url_column: URL, recipe.caption_column: CAPTION}
    table = table.select([c for c in wanted if c in table.column_names])
    return table.rename_columns([names.get(c, c) for c in table.column_names])


def _check_columns(path: Path, recipe: DownloadRecipe, present: list[str]) -> None:
    missing = [c for c in (recipe.url_column, recipe.caption_column) if c not in present]
    if missing:
        raise Blip2Error(f"{path}: no column {missing[0]!r} (columns: {', '.join(present)}); "
                         "set url_col/caption_col with --set")


def _kept_columns(recipe: DownloadRecipe) -> list[str]:
    """Columns copied into each sample's json besides the caption (and img2dataset's own url, key, ...)."""
    return [*recipe.extra_columns, *(["image", "captions"] if recipe.input_format == "json" else [])]


def _caption_list_table(path: Path, recipe: DownloadRecipe):
    """A LAVIS caption list (``[{image, caption}]``, one entry per caption) as one row per image: the
    first caption in ``caption``, all of them in ``captions`` (the pretraining loader draws one per visit)."""
    import pyarrow as pa

    data = read_json(path)
    if not isinstance(data, list) or not all(isinstance(d, dict) and "image" in d and "caption" in d for d in data):
        raise Blip2Error(f"{path}: expected a list of {{image, caption}}")
    captions: dict[str, list[str]] = {}
    for entry in data:
        texts = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        captions.setdefault(entry["image"], []).extend(str(t) for t in texts)
    root = recipe.images.rstrip("/")
    if not root:
        raise Blip2Error(f"{path}: give --images, the directory or URL prefix its image paths are relative to")
    if "://" not in root:
        root = Path(root).expanduser().resolve().as_uri()
    images = list(captions)
    return pa.table({
        recipe.url_column: [f"{root}/{image}" for image in images],
        recipe.caption_column: [captions[image][0] for image in images],
        "image": images,
        "captions": [[{"text": t} for t in captions[image]] for image in images],
    })


def _row_count(path: Path, recipe: DownloadRecipe) -> int:
    if recipe.input_format == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return _read_table(path, recipe).num_rows


def write_url_list(inputs: list[Path], recipe: DownloadRecipe, work: Path, subset: int | None,
                   seed: int) -> int:
    """Normalise (and sample) the metadata into ``work/_prepare/input``; reruns reuse it. Returns the row count.

    The subset is exact and reproducible: its size is split over the files by a multivariate
    hypergeometric draw, then each file's rows are drawn without replacement, all from one seeded
    generator. One file is in memory at a time.
    """
    import numpy as np
    import pyarrow.parquet as pq

    target = work / "_prepare" / "input"
    stamp_path = work / "_prepare" / "input.json"
    stamp = {"inputs": [str(p.resolve()) for p in inputs], "subset": subset, "seed": seed,
             "columns": [recipe.url_column, recipe.caption_column, *recipe.extra_columns], "images": recipe.images}
    if stamp_path.exists():
        done = json.loads(stamp_path.read_text())
        if {k: done.get(k) for k in stamp} != stamp:
            raise Blip2Error(f"{work} was prepared from other inputs or another --subset/--seed "
                             f"(see {stamp_path}); use a new --out")
        return int(done["rows"])
    counts = [_row_count(p, recipe) for p in inputs] if subset is not None else None
    if counts is not None and subset > sum(counts):
        raise Blip2Error(f"--subset {subset}: the input has only {sum(counts)} rows")
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if counts is not None:
        per_file = rng.multivariate_hypergeometric(np.array(counts), subset, method="marginals")
    rows = 0
    for i, path in enumerate(inputs):
        table = _read_table(path, recipe)
        if counts is not None:
            picked = np.sort(rng.choice(table.num_rows, size=int(per_file[i]), replace=False))
            table = table.take(picked)
        part = target / f"part-{i:05d}.parquet"
        tmp = part.with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, part)
        rows += table.num_rows
    atomic_write_text(stamp_path, json.dumps({**stamp, "rows": rows}, indent=1))
    return rows


# --- the download ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """img2dataset prints to stdout (also from its worker processes): send fd 1 to stderr meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def download(work: Path, recipe: DownloadRecipe) -> None:
    """Run img2dataset over ``work/_prepare/input`` into ``work``; finished shards are skipped."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download as img2dataset_download

    extras = _kept_columns(recipe)
    with _stdout_to_stderr():
        img2dataset_download(
            url_list=str(work / "_prepare" / "input"), input_format="parquet", url_col=URL,
            caption_col=CAPTION, save_additional_columns=extras or None, output_format="webdataset",
            output_folder=str(work), resize_mode=recipe.resize_mode,
            resize_only_if_bigger=recipe.resize_only_if_bigger, encode_format=recipe.encode_format,
            encode_quality=recipe.encode_quality, min_image_size=recipe.min_image_size,
            max_image_area=recipe.max_image_area, max_aspect_ratio=recipe.max_aspect_ratio,
            number_sample_per_shard=recipe.samples_per_shard, timeout=recipe.timeout, retries=recipe.retries,
            distributor=recipe.distributor, incremental_mode="incremental", enable_wandb=False,
            **recipe.img2dataset_options(),
        )


def summarize(work: Path, top: int = 5) -> dict[str, Any]:
    """Totals over every finished shard's img2dataset stats, and the most frequent failure reasons."""
    totals: Counter = Counter()
    reasons: Counter = Counter()
    shards = sorted(work.glob("*_stats.json"))
    for stats_file in shards:
        try:
            stats = json.loads(stats_file.read_text())
        except (OSError, ValueError):
            continue
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[key] += int(stats.get(key, 0))
        reasons.update({k: int(v) for k, v in (stats.get("status_dict") or {}).items() if k != "success"})
    count = totals["count"]
    return {
        "out": str(work),
        "shards": len(shards),
        "count": count,
        "successes": totals["successes"],
        "failed_to_download": totals["failed_to_download"],
        "failed_to_resize": totals["failed_to_resize"],
        "success_rate": totals["successes"] / count if count else 0.0,
        "top_failures": [{"reason": _short(reason), "count": n} for reason, n in reasons.most_common(top)],
    }


def _short(reason: str, width: int = 120) -> str:
    line = " ".join(reason.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def prepare_download(inputs: list[str], work: Path, recipe: DownloadRecipe, subset: int | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """The whole ``blip2 prepare <web source>`` job; returns the summary (also kept in ``_prepare``)."""
    require_extra("data", "downloading images (blip2 prepare)")
    recipe.check()
    files = input_files(inputs, recipe)
    rows = write_url_list(files, recipe, work, subset, seed)
    download(work, recipe)
    summary = {"rows": rows, **summarize(work)}
    atomic_write_text(work / "_prepare" / "summary.json", json.dumps(summary, indent=1))
    return summary
