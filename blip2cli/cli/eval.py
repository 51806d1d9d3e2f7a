"""``blip2 eval vqav2|okvqa|gqa|coco|nocaps|flickr30k|coco-retrieval``: benchmark scores from the official scorers.

Each command scores a predictions file (``--predictions``), or first runs a model over the benchmark
(``--model`` with ``--images``), sharded over ranks under torchrun or the DeepSpeed launcher and
resumable, into ``runs/<name>/predictions.json``; ``runs/<name>/provenance.json`` records what made them,
and a rerun made otherwise is refused (``--overwrite`` discards the old work). ``--zero-shot`` fills in
what was not given from the benchmark's recipe: the paper's model for its table, the files ``blip2
prepare`` writes, the image root.
An unreadable image is named on stderr and skipped; the rest is scored and the exit status is 3.
The scores are a table on stderr (stdout is for ``--json``), beside the paper's figures for the model evaluated
(a registry model the paper reports; ``--paper`` names one for a local checkpoint or predictions).
Parsing and rendering only: each command calls one function of ``blip2cli.eval.benchmark``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..eval.benchmark import Report, run_captions, run_gqa, run_retrieval, run_vqa
from ..eval.session import RunOptions
from ..runtime.errors import PartialFailure
from .options import (BeamScoringOpt, DeviceOpt, DtypeOpt, JsonOpt, LavisLlmOpt, RunsOpt, SetOpt, emit, name_option,
                      overwrite_option, recipe_option)

app = typer.Typer(help="Evaluate on the paper's benchmarks: run the paper's protocol (--zero-shot) or a model "
                       "(--model), or score predictions (--predictions).",
                  no_args_is_help=True)

PredictionsOpt = Annotated[Optional[Path], typer.Option(
    "--predictions", help="Predictions to score: a JSON list (or JSON lines) of objects.")]
QuestionsOpt = Annotated[Optional[Path], typer.Option("--questions", help="The official questions JSON.")]
GqaQuestionsOpt = Annotated[Optional[Path], typer.Option(
    "--questions", help="GQA questions with answers (testdev_balanced_questions.json, or LAVIS's list).")]
AnnotationsOpt = Annotated[Optional[Path], typer.Option("--annotations", help="The official annotations JSON.")]
CaptionsOpt = Annotated[Optional[Path], typer.Option(
    "--annotations", help="Reference captions in COCO caption format (images + annotations).")]
RetrievalAnnOpt = Annotated[Optional[Path], typer.Option(
    "--annotations", help="LAVIS retrieval split: a list of {image, caption: [...]}.")]
SubsetsOpt = Annotated[Optional[Path], typer.Option(
    "--subsets", help="JSON object: subset name -> list of image ids (default: the images' 'domain').")]
AllowMissingOpt = Annotated[bool, typer.Option(
    "--allow-missing", help="Score only what was predicted (the official tools require every question or image).")]
LegacyOpt = Annotated[bool, typer.Option(
    "--legacy-lavis", help="LAVIS's copy of the VQA scorer (pre-2021 answer processing) instead of the official one.")]
LemmatizeOpt = Annotated[bool, typer.Option(
    "--lemmatize", help="Lemmatise nouns and verbs of the predictions first (spaCy en_core_web_sm), as LAVIS "
                        "does when it generates OK-VQA answers.")]
SpiceOpt = Annotated[bool, typer.Option("--spice/--no-spice", help="Compute SPICE when its CoreNLP jars are present.")]
KOpt = Annotated[Optional[int], typer.Option(
    "--k", min=1, help="Candidates re-ranked by ITM per image and per text (default: the recipe's).")]
RetrievalBatchOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", min=1, help="Images per ViT pass (default: the recipe's).")]

ModelOpt = Annotated[Optional[str], typer.Option(help="Run this model over the benchmark (name, hub id, path).")]
ImagesOpt = Annotated[Optional[Path], typer.Option("--images", help="Image root of the benchmark (with --model).")]
ItemsOpt = Annotated[Optional[Path], typer.Option(
    "--items", help="Images to caption: a LAVIS list of {image, img_id?} (default: the references' images).")]
RecipeOpt = recipe_option("eval/<benchmark>, which sets the prompt and decoding")
NameOpt = name_option("<benchmark>-<model>, after what --model resolves to: a registry name, or "
                      "<run>-step-NNNNNN for a training checkpoint; plus a short hash where another model's work "
                      "has that name")
OverwriteOpt = overwrite_option("earlier predictions or scores (made by another model, recipe or inputs)")
PaperOpt = Annotated[Optional[str], typer.Option(
    "--paper", help="Show the paper's figures for this registry model beside the scores (default: the registry "
                    "model evaluated, if the paper reports it; none for a local checkpoint or --predictions).")]
ZeroShotOpt = Annotated[bool, typer.Option(
    "--zero-shot", help="The paper's protocol from the recipe, for what is not given: its model for this table, "
                        "the annotation files `blip2 prepare` writes (data/<dataset>/annotations/; used when no "
                        "file option is given) and the image root (data/coco/images, data/gqa/images, ...).")]


def report_skip(message: str) -> None:
    """An unreadable image, named on stderr as it is met."""
    print(f"error: {message}", file=sys.stderr)


def show(report: Report | None, json_out: bool, render: Callable[[dict], None]) -> None:
    """Show a benchmark's result (nothing on a helper rank); exit 3 if unreadable images were skipped."""
    if report is None:
        return
    if report.results is not None:
        print(f"predictions and results: {report.results.parent}", file=sys.stderr)
    emit(report.result, json_out, render_predictions if report.predictions_only else render)
    if report.skipped:
        raise PartialFailure("")


def render_predictions(result: dict) -> None:
    print(result["predictions"])


# a table row: its label, (metric key for the paper's figure or None, our value or text) per column, its style
Row = tuple[str, list[tuple[Optional[str], Any]], Optional[str]]


def print_table(corner: str, columns: list[str], rows: list[Row], paper: dict | None, scale: float, digits: int,
                title: str | None = None) -> None:
    """A result's table on stderr, values times ``scale`` with ``digits`` decimals. With the result's ``paper``,
    each column for which the paper has a figure is followed by ``paper`` and ``Δ`` (ours - paper), and a caption
    line names the paper's table, model and split."""
    from rich.console import Console
    from rich.table import Table

    figures, difference = (paper["figures"], paper["difference"]) if paper else ({}, {})
    compared = [any(cells[i][0] in figures for _, cells, _ in rows) for i in range(len(columns))]
    header = [part for name, c in zip(columns, compared) for part in ([name, "paper", "Δ"] if c else [name])]
    table = Table(corner, *header, box=None, title=title, title_justify="left")

    def number(value: float | None, sign: str = "") -> str:
        return "" if value is None else f"{scale * value:{sign}.{digits}f}"

    for label, cells, style in rows:
        shown = [label]
        for (key, value), c in zip(cells, compared):
            shown.append(value if isinstance(value, str) else "-" if value is None else number(value))
            shown += [number(figures.get(key)), number(difference.get(key), "+")] if c else []
        table.add_row(*shown, style=style)
    console = Console(stderr=True)
    if not console.is_terminal:  # a pipe or a log: whole rows, not rich's 80 columns
        console = Console(stderr=True, width=max(console.width, 160))
    console.print(table)
    if paper:
        note = f" ({paper['note']})" if paper.get("note") else ""
        console.print(f"paper: {paper['table']}, {paper['row']}, {paper['split']}{note}", markup=False,
                      highlight=False)


def render_accuracy(result: dict) -> None:
    rows: list[Row] = [("overall", [("accuracy", result["accuracy"])], "bold")]
    rows += [(name, [(None, value)], None) for name, value in result.get("per_answer_type", {}).items()]
    rows += [(name, [(None, value)], "dim") for name, value in sorted(result.get("per_question_type", {}).items())]
    print_table("", ["accuracy (%)"], rows, result.get("paper"), 1, 2, f"{result['num_questions']} questions")


def render_captions(result: dict) -> None:
    from ..eval.caption_scoring import METRICS

    columns = {"overall": result, **result.get("subsets", {})}
    keys = {name: "" if name == "overall" else f"{name}/" for name in columns}
    rows: list[Row] = [(metric, [(keys[name] + metric, s.get(metric)) for name, s in columns.items()], None)
                       for metric in METRICS if metric in result]
    rows.append(("images", [(None, str(s["num_images"])) for s in columns.values()], "dim"))
    print_table("x 100", list(columns), rows, result.get("paper"), 100, 1)


def render_recall(result: dict) -> None:
    rows: list[Row] = [(label, [(f"{side}_r{n}", result[f"{side}_r{n}"]) for n in (1, 5, 10)], None)
                       for label, side in (("text retrieval (TR)", "txt"), ("image retrieval (IR)", "img"))]
    print_table("", ["R@1", "R@5", "R@10"], rows, result.get("paper"), 1, 1,
                f"{result['num_images']} images, {result['num_texts']} texts, k={result['k']}")


def run_options(params: dict) -> RunOptions:
    """The model-run options of a command, from its parameters (``locals()``); those it lacks keep their defaults."""
    names = {f.name for f in fields(RunOptions)}
    given = {k: v for k, v in params.items() if k in names}
    overrides = list(params.get("set_") or [])
    if params.get("beam_scoring"):
        overrides.append(f"decoding.beam_scoring={params['beam_scoring'].value}")
    return RunOptions(**given, overrides=overrides)


@app.command("vqav2")
def vqav2(
    predictions: PredictionsOpt = None,
    questions: QuestionsOpt = None,
    annotations: AnnotationsOpt = None,
    json_out: JsonOpt = False,
    allow_missing: AllowMissingOpt = False,
    legacy_lavis: LegacyOpt = False,
    model: ModelOpt = None, llm: LavisLlmOpt = None, images: ImagesOpt = None, recipe: RecipeOpt = None,
    set_: SetOpt = None, out: RunsOpt = Path("runs"), name: NameOpt = None, device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto", zero_shot: ZeroShotOpt = False, overwrite: OverwriteOpt = False,
    beam_scoring: BeamScoringOpt = None, paper: PaperOpt = None,
) -> None:
    """VQAv2 accuracy with the official VQA evaluation algorithm (overall, per answer and question type).

    \bExamples:
    blip2 eval vqav2 --zero-shot
    blip2 eval vqav2 --model blip2-opt-2.7b --images coco/ --questions Q.json --annotations A.json
    blip2 eval vqav2 --predictions preds.json --questions Q.json --annotations A.json --json
    blip2 eval vqav2 --predictions preds.json --questions Q.json --annotations A.json --paper blip2-flan-t5-xl
    """
    options = run_options(locals())
    show(run_vqa("vqav2", options, predictions, questions, annotations, allow_missing, legacy_lavis,
                 on_skip=report_skip), json_out, render_accuracy)


@app.command("okvqa")
def okvqa(
    predictions: PredictionsOpt = None,
    questions: QuestionsOpt = None,
    annotations: AnnotationsOpt = None,
    json_out: JsonOpt = False,
    allow_missing: AllowMissingOpt = False,
    legacy_lavis: LegacyOpt = False,
    lemmatize: LemmatizeOpt = False,
    model: ModelOpt = None, llm: LavisLlmOpt = None, images: ImagesOpt = None, recipe: RecipeOpt = None,
    set_: SetOpt = None, out: RunsOpt = Path("runs"), name: NameOpt = None, device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto", zero_shot: ZeroShotOpt = False, overwrite: OverwriteOpt = False,
    beam_scoring: BeamScoringOpt = None, paper: PaperOpt = None,
) -> None:
    """OK-VQA accuracy: the VQA scorer on the OK-VQA question and annotation files."""
    options = run_options(locals())
    show(run_vqa("okvqa", options, predictions, questions, annotations, allow_missing, legacy_lavis, lemmatize,
                 on_skip=report_skip), json_out, render_accuracy)


@app.command("gqa")
def gqa(
    predictions: PredictionsOpt = None,
    questions: GqaQuestionsOpt = None,
    json_out: JsonOpt = False,
    allow_missing: AllowMissingOpt = False,
    model: ModelOpt = None, llm: LavisLlmOpt = None, images: ImagesOpt = None, recipe: RecipeOpt = None,
    set_: SetOpt = None, out: RunsOpt = Path("runs"), name: NameOpt = None, device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto", zero_shot: ZeroShotOpt = False, overwrite: OverwriteOpt = False,
    beam_scoring: BeamScoringOpt = None, paper: PaperOpt = None,
) -> None:
    """GQA accuracy: exact match after the VQA answer normalisation of both sides."""
    options = run_options(locals())
    show(run_gqa(options, predictions, questions, allow_missing, on_skip=report_skip), json_out, render_accuracy)


@app.command("coco")
def coco(
    predictions: PredictionsOpt = None,
    annotations: CaptionsOpt = None,
    json_out: JsonOpt = False,
    spice: SpiceOpt = True,
    allow_missing: AllowMissingOpt = False,
    model: ModelOpt = None, llm: LavisLlmOpt = None, images: ImagesOpt = None, items: ItemsOpt = None,
    recipe: RecipeOpt = None, set_: SetOpt = None, out: RunsOpt = Path("runs"), name: NameOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", zero_shot: ZeroShotOpt = False,
    overwrite: OverwriteOpt = False, beam_scoring: BeamScoringOpt = None, paper: PaperOpt = None,
) -> None:
    """COCO captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr and SPICE as COCOEvalCap computes them.

    \bExamples:
    blip2 eval coco --zero-shot
    blip2 eval coco --predictions captions.json --annotations coco_karpathy_test_gt.json
    """
    options = run_options(locals())
    show(run_captions("coco", options, predictions, annotations, spice, allow_missing, on_skip=report_skip),
         json_out, render_captions)


@app.command("nocaps")
def nocaps(
    predictions: PredictionsOpt = None,
    annotations: CaptionsOpt = None,
    subsets: SubsetsOpt = None,
    json_out: JsonOpt = False,
    spice: SpiceOpt = True,
    allow_missing: AllowMissingOpt = False,
    model: ModelOpt = None, llm: LavisLlmOpt = None, images: ImagesOpt = None, items: ItemsOpt = None,
    recipe: RecipeOpt = None, set_: SetOpt = None, out: RunsOpt = Path("runs"), name: NameOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", zero_shot: ZeroShotOpt = False,
    overwrite: OverwriteOpt = False, beam_scoring: BeamScoringOpt = None, paper: PaperOpt = None,
) -> None:
    """NoCaps captioning: the COCO metrics overall and per subset (in-, near-, out-domain)."""
    options = run_options(locals())
    show(run_captions("nocaps", options, predictions, annotations, spice, allow_missing, subsets,
                      on_skip=report_skip), json_out, render_captions)


def show_retrieval(report: Report | None, json_out: bool) -> None:
    """Show retrieval recall (nothing on a helper rank)."""
    if report is None:
        return
    print(f"results: {report.results}", file=sys.stderr)
    emit(report.result, json_out, render_recall)


@app.command("flickr30k")
def flickr30k(
    annotations: RetrievalAnnOpt = None, model: ModelOpt = None, images: ImagesOpt = None, k: KOpt = None,
    batch_size: RetrievalBatchOpt = None, json_out: JsonOpt = False, out: RunsOpt = Path("runs"),
    name: NameOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", zero_shot: ZeroShotOpt = False,
    overwrite: OverwriteOpt = False, paper: PaperOpt = None,
) -> None:
    """Flickr30K 1K-test retrieval: ITC for all pairs, top k re-ranked by ITM; TR@1/5/10 and IR@1/5/10.

    \bExamples:
    blip2 eval flickr30k --zero-shot
    blip2 eval flickr30k --model blip2-itm-vit-g-coco --images flickr30k/ --annotations flickr30k_test.json
    """
    options = run_options(locals())
    show_retrieval(run_retrieval("flickr30k", options, annotations, k, batch_size), json_out)


@app.command("coco-retrieval")
def coco_retrieval(
    annotations: RetrievalAnnOpt = None, model: ModelOpt = None, images: ImagesOpt = None, k: KOpt = None,
    batch_size: RetrievalBatchOpt = None, json_out: JsonOpt = False, out: RunsOpt = Path("runs"),
    name: NameOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", overwrite: OverwriteOpt = False,
    paper: PaperOpt = None,
) -> None:
    """COCO 5K-test retrieval (Karpathy split): as flickr30k."""
    options = run_options(locals())
    show_retrieval(run_retrieval("coco-retrieval", options, annotations, k, batch_size), json_out)
