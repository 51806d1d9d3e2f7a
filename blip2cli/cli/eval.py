"""``blip2 eval vqav2|okvqa|gqa|coco|nocaps``: benchmark scores from the official scorers.

Each command scores a predictions file (``--predictions``), or first runs a model over the benchmark
(``--model`` with ``--images``), sharded over ranks under torchrun or the DeepSpeed launcher and
resumable, into ``runs/<name>/predictions.json``; ``runs/<name>/provenance.json`` records what made them,
and a rerun made otherwise is refused (``--overwrite`` discards the old work). ``--zero-shot`` fills in
what was not given from the benchmark's recipe: the paper's model for its table, the files ``blip2
prepare`` writes, the image root.
An unreadable image is named on stderr and skipped; the rest is scored and the exit status is 3.
Parsing, validation and rendering only: the work lives in ``blip2cli.eval``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import Blip2Error, PartialFailure
from .options import DeviceOpt, JsonOpt, SetOpt

app = typer.Typer(help="Evaluate on the paper's benchmarks: run the paper's protocol (--zero-shot) or a model "
                       "(--model), or score predictions (--predictions).",
                  no_args_is_help=True)

PredictionsOpt = Annotated[Optional[Path], typer.Option(
    "--predictions", help="Predictions to score: a JSON list (or JSON lines) of objects.")]
QuestionsOpt = Annotated[Optional[Path], typer.Option("--questions", help="The official questions JSON.")]
AnnotationsOpt = Annotated[Optional[Path], typer.Option("--annotations", help="The official annotations JSON.")]
CaptionsOpt = Annotated[Optional[Path], typer.Option(
    "--annotations", help="Reference captions in COCO caption format (images + annotations).")]
AllowMissingOpt = Annotated[bool, typer.Option(
    "--allow-missing", help="Score only what was predicted (the official tools require every question or image).")]
LegacyOpt = Annotated[bool, typer.Option(
    "--legacy-lavis", help="LAVIS's copy of the VQA scorer (pre-2021 answer processing) instead of the official one.")]
SpiceOpt = Annotated[bool, typer.Option("--spice/--no-spice", help="Compute SPICE when its CoreNLP jars are present.")]


ModelOpt = Annotated[Optional[str], typer.Option(help="Run this model over the benchmark (name, hub id, path).")]
LlmOpt = Annotated[Optional[str], typer.Option(help="The LLM of a LAVIS stage-2 .pth.")]
ImagesOpt = Annotated[Optional[Path], typer.Option("--images", help="Image root of the benchmark (with --model).")]
ItemsOpt = Annotated[Optional[Path], typer.Option(
    "--items", help="Images to caption: a LAVIS list of {image, img_id?} (default: the references' images).")]
RecipeOpt = Annotated[Optional[str], typer.Option(help="Prompt/decoding recipe (default: eval/<benchmark>).")]
OutOpt = Annotated[Path, typer.Option(help="Directory for runs: predictions.json and metrics.json go there.")]
NameOpt = Annotated[Optional[str], typer.Option(
    help="Run name (default: <benchmark>-<model>, after what --model resolves to: a registry name, or "
         "<run>-step-NNNNNN for a training checkpoint; plus a short hash where another model's work has that name).")]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Discard the run directory's earlier predictions or scores (made by another model, recipe "
                        "or inputs) and start again.")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16, float16")]
ZeroShotOpt = Annotated[bool, typer.Option(
    "--zero-shot", help="The paper's protocol from the recipe, for what is not given: its model for this table, "
                        "the annotation files `blip2 prepare` writes (data/<dataset>/annotations/; used when no "
                        "file option is given) and the image root (data/coco/images, data/gqa/images, ...).")]


class ModelRun:
    """What ``--model`` needs; ``None`` model means: score ``--predictions``."""

    def __init__(self, model, llm, images, recipe, overrides, out, name, device, dtype, items=None, zero_shot=False,
                 overwrite=False):
        self.model, self.llm, self.images, self.recipe, self.overrides = model, llm, images, recipe, overrides or []
        self.out, self.name, self.device, self.dtype, self.items = out, name, device, dtype, items
        self.zero_shot, self.images_hint, self.notes, self.skipped = zero_shot, "check --images", [], 0
        self.overwrite, self.directory, self.provenance = overwrite, None, None

    def run_dir(self, command: str) -> Path:
        """The run directory ``prepare`` chose."""
        if self.directory is None:
            raise RuntimeError(f"eval {command}: the run directory is chosen by prepare()")
        return self.directory

    def prepare(self, command: str, work: str, settings: dict[str, Any], inputs: dict[str, Path | None]) -> Path:
        """Choose the run directory from what makes this run's ``work``, refusing one that holds work made
        otherwise (every rank, before the model loads)."""
        from ..eval import provenance

        label, identity = provenance.identify(self.model, self.llm)
        record = provenance.record(command, identity, self.resolved_dtype(), settings,
                                   {**inputs, "images": self.images})
        directory = self.out / self.name if self.name else provenance.default_dir(self.out, command, label, record)
        self.lock_directory(directory)
        provenance.check(directory, record, work, self.overwrite)
        self.directory, self.provenance = directory, record
        return directory

    def lock_directory(self, directory: Path) -> None:
        """One run per directory: rank 0 holds its lock until the process ends (a second run stops at once,
        naming the holder)."""
        from ..train.rundir import RunLock

        if int(os.environ.get("RANK", "0")) == 0:  # before the process group exists: the launcher's rank
            self.lock = RunLock(directory).acquire()

    def start(self) -> None:
        """Rank 0 makes the run directory this run's (``--overwrite`` discards, then ``provenance.json`` is
        written) before anything is predicted; the other ranks wait for it."""
        from ..eval import provenance
        from ..train import dist

        if dist.rank() == 0:
            provenance.claim(self.directory, self.provenance, self.overwrite)
        if dist.is_distributed():
            import torch

            torch.distributed.barrier()

    def resolved_dtype(self) -> str:
        """The dtype the model will run in (``auto`` resolved for this machine's device)."""
        from ..api import resolve_device, resolve_dtype

        return str(resolve_dtype(self.dtype, resolve_device(self.device))).removeprefix("torch.")

    def settings(self, command: str, cls: type | None = None):
        """The benchmark's recipe (prompt, decoding, zero-shot protocol), with ``--set`` overrides."""
        from ..config import load_recipe
        from ..eval.generation import GenerationEval

        return load_recipe(cls or GenerationEval, self.recipe or f"eval/{command}", self.overrides)

    def apply_zero_shot(self, command: str, protocol, predicting: bool, files: dict[str, Path | None]
                        ) -> dict[str, Path | None]:
        """With ``--zero-shot``: the protocol's files (when none was given), model and image root."""
        if not self.zero_shot:
            return files
        if not protocol.model:
            raise Blip2Error(f"eval {command}: recipe {self.recipe or f'eval/{command}'} has no zero_shot protocol")
        if all(path is None for path in files.values()):
            files = {option: protocol.file(option) for option in files}
        if predicting:
            self.model = self.model or protocol.model
            if self.images is None:
                self.images, self.images_hint = Path(protocol.images), protocol.image_hint()
        if protocol.note:
            self.notes.append(protocol.note)
        return files

    def load(self):
        """The model, on this rank's GPU when a launcher started several ranks."""
        from ..api import load, quiet_transformers
        from ..train.loop import init_distributed

        device = self.device
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dev = init_distributed(with_deepspeed=False)
            device = str(dev) if dev.type == "cuda" else self.device
        quiet_transformers()
        return load(self.model, device=device, dtype=self.dtype, llm=self.llm)


def _zero_shot(command: str, run: ModelRun, predictions: Path | None, **files: Path | None) -> dict[str, Path | None]:
    """``run.apply_zero_shot`` with the generation recipe's protocol (read only under ``--zero-shot``)."""
    protocol = run.settings(command).zero_shot if run.zero_shot else None
    return run.apply_zero_shot(command, protocol, predictions is None, files)


def _report_skip(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _predictions(command: str, predictions: Path | None, run: ModelRun | None, make_items, key: str,
                 field: str, references: Path | None = None, inputs: dict[str, Path | None] | None = None
                 ) -> Path | None:
    """The predictions file to score: the given one, or one made by running ``run.model``.

    Returns None on ranks other than 0, which only help to predict. Items whose image cannot be read get no
    prediction: each such image is named on stderr and counted in ``run.skipped``. The ``references`` scored
    afterwards must exist before the model runs. ``inputs`` (the files the items come from) are recorded
    with the model and settings in the run's ``provenance.json``.
    """
    from ..eval.data import check_image_root, check_some_images

    if predictions is not None:
        if run is not None and run.model is not None:
            raise Blip2Error(f"eval {command}: give --predictions or --model, not both")
        return predictions
    if run is None or run.model is None:
        raise Blip2Error(f"eval {command}: give --model (with --images) to run a model, or --predictions FILE "
                         "(or --zero-shot for the paper's protocol)")
    if run.images is None:
        raise Blip2Error(f"eval {command}: --model needs --images, the benchmark's image root")
    items = make_items()
    check_image_root(run.images, run.images_hint)
    check_some_images([it.image for it in items], run.images)
    if references is not None and not references.exists():
        raise Blip2Error(f"{references}: no such file (--annotations)")
    from ..eval.generation import predict
    from ..train import dist

    settings = run.settings(command)
    out = run.prepare(command, "predictions", settings.provenance(), inputs or {})
    model = run.load()
    run.start()
    path = predict(model, items, settings, out, key, field, on_skip=_report_skip)
    if dist.rank() != 0:
        return None
    run.skipped = len({it.id for it in items}) - len(read_json(path))
    return path


def _required(command: str, option: str, path: Path | None) -> Path:
    if path is None:
        raise Blip2Error(f"eval {command}: {option} FILE is required")
    return path


def read_json(path: Path, lines_ok: bool = False) -> Any:
    """A JSON file (or, with ``lines_ok``, JSON lines as a list); every failure is one line naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Blip2Error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise Blip2Error(f"{path}: is a directory, not a JSON file") from None
    except UnicodeDecodeError:
        raise Blip2Error(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise Blip2Error(f"{path}: cannot read ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        error = e
    if lines_ok:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            pass
    raise Blip2Error(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})")


def _naming_files(score: Callable[[], dict], files: dict[str, Path]) -> dict:
    """Run a scorer; its errors about "predictions: ..." or "annotations: ..." name the user's file instead."""
    try:
        return score()
    except Blip2Error as e:
        what, sep, rest = str(e).partition(": ")
        if sep and what in files:
            raise Blip2Error(f"{files[what]}: {rest}") from None
        raise


def _emit(result: dict, json_out: bool, render: Callable[[dict], None]) -> None:
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if json_out:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    else:
        render(result)


def _render_accuracy(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("", "accuracy (%)", box=None, title=f"{result['num_questions']} questions", title_justify="left")
    table.add_row("overall", f"{result['accuracy']:.2f}", style="bold")
    for name, value in result.get("per_answer_type", {}).items():
        table.add_row(name, f"{value:.2f}")
    for name, value in sorted(result.get("per_question_type", {}).items()):
        table.add_row(f"[dim]{name}[/dim]", f"[dim]{value:.2f}[/dim]")
    Console().print(table)


def _render_captions(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..eval.caption_scoring import METRICS

    columns = {"overall": result, **result.get("subsets", {})}
    table = Table("x 100", *columns, box=None)
    for metric in (m for m in METRICS if m in result):
        table.add_row(metric, *(f"{100 * s[metric]:.1f}" if metric in s else "-" for s in columns.values()))
    table.add_row("images", *(str(s["num_images"]) for s in columns.values()), style="dim")
    Console().print(table)


def _vqa(command: str, predictions: Path | None, questions: Path | None, annotations: Path | None,
         allow_missing: bool, legacy_lavis: bool, lemmatize: bool = False, run: ModelRun | None = None) -> dict | None:
    from ..eval import vqa_scoring
    from ..eval.data import vqa_items

    given = _zero_shot(command, run, predictions, questions=questions, annotations=annotations)
    questions = _required(command, "--questions", given["questions"])
    annotations = given["annotations"]
    if not (annotations is None and _runs_model(run)):  # test-dev: predictions for the server only
        annotations = _required(command, "--annotations", annotations)
    predictions = _predictions(command, predictions, run, lambda: vqa_items(questions, run.images),
                               "question_id", "answer", annotations, {"questions": questions})
    if predictions is None:
        return None
    if annotations is None:
        return _predictions_only(predictions)
    allow_missing = allow_missing or run.skipped > 0
    if run is not None and run.model is not None:
        lemmatize = lemmatize or run.settings(command).lemmatize
    files = {"predictions": predictions, "questions": questions, "annotations": annotations}
    preds, qs, anns = (read_json(files["predictions"], lines_ok=True), read_json(files["questions"]),
                       read_json(files["annotations"]))
    if lemmatize and isinstance(preds, list) and all(isinstance(p, dict) and isinstance(p.get("answer"), str)
                                                     for p in preds):
        lemmas = vqa_scoring.lemmatize([p["answer"] for p in preds])
        preds = [{**p, "answer": lemma} for p, lemma in zip(preds, lemmas)]
    result = _naming_files(lambda: vqa_scoring.score_vqa(preds, anns, qs, allow_missing=allow_missing,
                                                         legacy_lavis=legacy_lavis), files)
    if lemmatize:
        result["notes"].append("predictions lemmatised first (spaCy en_core_web_sm nouns and verbs)")
    return result


def _runs_model(run: ModelRun | None) -> bool:
    return run is not None and run.model is not None


def _predictions_only(path: Path) -> dict:
    path = path.resolve()
    return {"predictions": str(path), "notes": [f"no annotations given: predictions only, in the official results "
                                                f"format for the evaluation server: {path}"]}


def _finish(result: dict | None, run: ModelRun | None, command: str, json_out: bool, render) -> None:
    """Report the result (and keep it beside the predictions); exit 3 if unreadable images were skipped."""
    if result is None:
        return  # a helper rank
    skipped = run.skipped if run is not None else 0
    result["notes"] = [*(run.notes if run is not None else []), *result.get("notes", [])]
    if skipped:
        result["skipped"] = skipped
        result["notes"].append(f"{skipped} item(s) have no prediction: their images could not be read (each named "
                               "above); the scores cover the rest, and a rerun predicts only those")
    if "predictions" in result:
        _emit(result, json_out, lambda r: print(r["predictions"]))
    else:
        if run is not None and run.model is not None:
            out = run.run_dir(command) / "metrics.json"
            out.write_text(json.dumps(result, indent=2))
            print(f"predictions and metrics: {out.parent}", file=sys.stderr)
        _emit(result, json_out, render)
    if skipped:
        raise PartialFailure("")


@app.command("vqav2")
def vqav2(
    predictions: PredictionsOpt = None,
    questions: QuestionsOpt = None,
    annotations: AnnotationsOpt = None,
    json_out: JsonOpt = False,
    allow_missing: AllowMissingOpt = False,
    legacy_lavis: LegacyOpt = False,
    model: ModelOpt = None, llm: LlmOpt = None, images: ImagesOpt = None, recipe: RecipeOpt = None,
    set_: SetOpt = None, out: OutOpt = Path("runs"), name: NameOpt = None, device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto", zero_shot: ZeroShotOpt = False, overwrite: OverwriteOpt = False,
) -> None:
    """VQAv2 accuracy with the official VQA evaluation algorithm (overall, per answer and question type).

    \bExamples:
    blip2 eval vqav2 --zero-shot
    blip2 eval vqav2 --model blip2-opt-2.7b --images coco/ --questions Q.json --annotations A.json
    blip2 eval vqav2 --predictions preds.json --questions Q.json --annotations A.json --json
    """
    run = ModelRun(model, llm, images, recipe, set_, out, name, device, dtype, zero_shot=zero_shot,
                   overwrite=overwrite)
    result = _vqa("vqav2", predictions, questions, annotations, allow_missing, legacy_lavis, run=run)
    _finish(result, run, "vqav2", json_out, _render_accuracy)


@app.command("okvqa")
def okvqa(
    predictions: PredictionsOpt = None,
    questions: QuestionsOpt = None,
    annotations: AnnotationsOpt = None,
    json_out: JsonOpt = False,
    allow_missing: AllowMissingOpt = False,
    legacy_lavis: LegacyOpt = False,
    lemmatize: Annotated[bool, typer.Option(
        "--lemmatize", help="Lemmatise nouns and verbs of the predictions first (spaCy en_core_web_sm), as LAVIS "
                            "does when it generates OK-VQA answers.")] = False,
    model: ModelOpt = None, llm: LlmOpt = None, images: ImagesOpt = None, recipe: RecipeOpt = None,
    set_: SetOpt = None, out: OutOpt = Path("runs"), name: NameOpt = None, device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto", zero_shot: ZeroShotOpt = False, overwrite: OverwriteOpt = False,
) -> None:
    """OK-VQA accuracy: the VQA scorer on the OK-VQA question and annotation files."""
    run = ModelRun(model, llm, images, recipe, set_, out, name, device, dtype, zero_shot=zero_shot,
                   overwrite=overwrite)
    result = _vqa("okvqa", predictions, questions, annotations, allow_missing, legacy_lavis, lemmatize, run=run)
    _finish(result, run, "okvqa", json_out, _render_accuracy)


@app.command("gqa")
def gqa(
    predictions: PredictionsOpt = None,
    questions: Annotated[Optional[Path], typer.Option(
        "--questions", help="GQA questions with answers (testdev_balanced_questions.json, or LAVIS's list).")] = None,
    json_out: JsonOpt = False,
    allow_missing: AllowMissingOpt = False,
    model: ModelOpt = None, llm: LlmOpt = None, images: ImagesOpt = None, recipe: RecipeOpt = None,
    set_: SetOpt = None, out: OutOpt = Path("runs"), name: NameOpt = None, device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto", zero_shot: ZeroShotOpt = False, overwrite: OverwriteOpt = False,
) -> None:
    """GQA accuracy: exact match after the VQA answer normalisation of both sides."""
    from ..eval import vqa_scoring
    from ..eval.data import gqa_items

    run = ModelRun(model, llm, images, recipe, set_, out, name, device, dtype, zero_shot=zero_shot,
                   overwrite=overwrite)
    questions = _required("gqa", "--questions", _zero_shot("gqa", run, predictions, questions=questions)["questions"])
    predictions = _predictions("gqa", predictions, run, lambda: gqa_items(questions, run.images), "question_id",
                               "answer", inputs={"questions": questions})
    if predictions is None:
        return
    files = {"predictions": predictions, "questions": questions}
    preds, qs = read_json(files["predictions"], lines_ok=True), read_json(files["questions"])
    allow = allow_missing or run.skipped > 0
    result = _naming_files(lambda: vqa_scoring.score_gqa(preds, qs, allow_missing=allow), files)
    _finish(result, run, "gqa", json_out, _render_accuracy)


def _captions(command: str, predictions: Path | None, annotations: Path | None, spice: bool, allow_missing: bool,
              subsets: Path | None = None, run: ModelRun | None = None) -> dict | None:
    from ..eval import caption_scoring
    from ..eval.data import caption_items

    given = _zero_shot(command, run, predictions, annotations=annotations, items=run.items)
    annotations, run.items = given["annotations"], given["items"]
    if not (annotations is None and _runs_model(run) and run.items is not None):  # a test split: no references
        annotations = _required(command, "--annotations", annotations)
    predictions = _predictions(command, predictions, run,
                               lambda: caption_items(annotations, run.images, run.items), "image_id", "caption",
                               annotations, {"annotations": annotations, "items": run.items})
    if predictions is None:
        return None
    if annotations is None:
        return _predictions_only(predictions)
    allow_missing = allow_missing or run.skipped > 0
    files = {"predictions": predictions, "annotations": annotations}
    preds, anns = read_json(files["predictions"], lines_ok=True), read_json(files["annotations"])
    groups = caption_scoring.domain_subsets(anns) if command == "nocaps" else None
    if subsets is not None:
        groups = read_subsets(subsets)
    return _naming_files(lambda: caption_scoring.score_captions(preds, anns, spice, subsets=groups,
                                                                allow_missing=allow_missing), files)


def read_subsets(path: Path) -> dict[str, set]:
    """A JSON object: subset name -> list of image ids."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(ids, list) and all(isinstance(i, (int, str)) for i in ids)
                                             for ids in data.values()):
        raise Blip2Error(f"{path}: expected a JSON object mapping each subset name to a list of image ids")
    return {str(name): set(ids) for name, ids in data.items()}


@app.command("coco")
def coco(
    predictions: PredictionsOpt = None,
    annotations: CaptionsOpt = None,
    json_out: JsonOpt = False,
    spice: SpiceOpt = True,
    allow_missing: AllowMissingOpt = False,
    model: ModelOpt = None, llm: LlmOpt = None, images: ImagesOpt = None, items: ItemsOpt = None,
    recipe: RecipeOpt = None, set_: SetOpt = None, out: OutOpt = Path("runs"), name: NameOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", zero_shot: ZeroShotOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """COCO captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr and SPICE as COCOEvalCap computes them.

    \bExamples:
    blip2 eval coco --zero-shot
    blip2 eval coco --predictions captions.json --annotations coco_karpathy_test_gt.json
    """
    run = ModelRun(model, llm, images, recipe, set_, out, name, device, dtype, items, zero_shot, overwrite)
    result = _captions("coco", predictions, annotations, spice, allow_missing, run=run)
    _finish(result, run, "coco", json_out, _render_captions)


@app.command("nocaps")
def nocaps(
    predictions: PredictionsOpt = None,
    annotations: CaptionsOpt = None,
    subsets: Annotated[Optional[Path], typer.Option(
        "--subsets", help="JSON object: subset name -> list of image ids (default: the images' 'domain').")] = None,
    json_out: JsonOpt = False,
    spice: SpiceOpt = True,
    allow_missing: AllowMissingOpt = False,
    model: ModelOpt = None, llm: LlmOpt = None, images: ImagesOpt = None, items: ItemsOpt = None,
    recipe: RecipeOpt = None, set_: SetOpt = None, out: OutOpt = Path("runs"), name: NameOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", zero_shot: ZeroShotOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """NoCaps captioning: the COCO metrics overall and per subset (in-, near-, out-domain)."""
    run = ModelRun(model, llm, images, recipe, set_, out, name, device, dtype, items, zero_shot, overwrite)
    result = _captions("nocaps", predictions, annotations, spice, allow_missing, subsets, run=run)
    _finish(result, run, "nocaps", json_out, _render_captions)


def _retrieval(command: str, annotations: Path | None, run: ModelRun, k: int | None, batch_size: int | None,
               json_out: bool) -> None:
    """Retrieval needs every image: unreadable ones are all named in one error line before anything runs."""
    from ..eval.data import check_image_root, retrieval_items, unreadable_images
    from ..eval.retrieval import RetrievalEval, recall_metrics, retrieval_scores
    from ..train import dist

    spec = run.settings(command, RetrievalEval)
    annotations = run.apply_zero_shot(command, spec.zero_shot, True, {"annotations": annotations})["annotations"]
    annotations = _required(command, "--annotations", annotations)
    if run.model is None or run.images is None:
        protocol = ", or --zero-shot" if spec.zero_shot.model else ""
        raise Blip2Error(f"eval {command}: give --model (an ITM checkpoint, e.g. blip2-itm-vit-g-coco) and "
                         f"--images{protocol}")
    images, texts, img2txt, txt2img = retrieval_items(annotations, run.images)
    check_image_root(run.images, run.images_hint)
    bad = unreadable_images(images)
    if bad:
        raise Blip2Error(f"{len(bad)} of {len(images)} images cannot be read, and retrieval ranks every text against "
                         f"every image, so nothing was run: {'; '.join(bad)}")
    k, batch_size = k or spec.k, batch_size or spec.batch_size
    out = run.prepare(command, "retrieval scores", {"k": k}, {"annotations": annotations})
    model = run.load()
    run.start()
    scores = retrieval_scores(model, images, texts, k=k, batch_size=batch_size, work_dir=out)
    if dist.rank() != 0:
        return
    result = {**recall_metrics(scores, img2txt, txt2img), "k": k, "num_images": len(images), "num_texts": len(texts)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    print(f"metrics: {out / 'metrics.json'}", file=sys.stderr)
    _emit({**result, "notes": run.notes}, json_out, _render_recall)


def _render_recall(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("", "R@1", "R@5", "R@10", box=None, title=f"{result['num_images']} images, {result['num_texts']} texts, "
                  f"k={result['k']}", title_justify="left")
    table.add_row("text retrieval (TR)", *(f"{result[f'txt_r{n}']:.1f}" for n in (1, 5, 10)))
    table.add_row("image retrieval (IR)", *(f"{result[f'img_r{n}']:.1f}" for n in (1, 5, 10)))
    Console().print(table)


KOpt = Annotated[Optional[int], typer.Option(
    "--k", min=1, help="Candidates re-ranked by ITM per image and per text (default: the recipe's).")]
RetrievalBatchOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", min=1, help="Images per ViT pass (default: the recipe's).")]
RetrievalAnnOpt = Annotated[Optional[Path], typer.Option(
    "--annotations", help="LAVIS retrieval split: a list of {image, caption: [...]}.")]


@app.command("flickr30k")
def flickr30k(
    annotations: RetrievalAnnOpt = None, model: ModelOpt = None, images: ImagesOpt = None, k: KOpt = None,
    batch_size: RetrievalBatchOpt = None, json_out: JsonOpt = False, out: OutOpt = Path("runs"),
    name: NameOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", zero_shot: ZeroShotOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Flickr30K 1K-test retrieval: ITC for all pairs, top k re-ranked by ITM; TR@1/5/10 and IR@1/5/10.

    \bExamples:
    blip2 eval flickr30k --zero-shot
    blip2 eval flickr30k --model blip2-itm-vit-g-coco --images flickr30k/ --annotations flickr30k_test.json
    """
    run = ModelRun(model, None, images, None, None, out, name, device, dtype, zero_shot=zero_shot,
                   overwrite=overwrite)
    _retrieval("flickr30k", annotations, run, k, batch_size, json_out)


@app.command("coco-retrieval")
def coco_retrieval(
    annotations: RetrievalAnnOpt = None, model: ModelOpt = None, images: ImagesOpt = None, k: KOpt = None,
    batch_size: RetrievalBatchOpt = None, json_out: JsonOpt = False, out: OutOpt = Path("runs"),
    name: NameOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", overwrite: OverwriteOpt = False,
) -> None:
    """COCO 5K-test retrieval (Karpathy split): as flickr30k."""
    run = ModelRun(model, None, images, None, None, out, name, device, dtype, overwrite=overwrite)
    _retrieval("coco-retrieval", annotations, run, k, batch_size, json_out)
