"""The paper's benchmarks end to end, one function per kind: VQA (``run_vqa``), GQA (``run_gqa``), captioning
(``run_captions``) and retrieval (``run_retrieval``).

Each scores a predictions file, or first runs a model over the benchmark (sharded over ranks under a
launcher, resumable) into ``<out>/<name>/predictions.json``, recorded in ``provenance.json``; with
``zero_shot``, the benchmark's recipe fills in what was not given. It returns the result on rank 0 (None on
the other ranks, which only help to predict), with the paper's figures for the model (``paper``, see
``blip2cli.eval.paper``), and keeps a model's result in ``results.json`` beside its predictions. An item
whose image cannot be read gets no prediction: the image is passed to ``on_skip``, the rest is scored, and the
result counts it in ``skipped``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.errors import Blip2Error
from ..runtime.io import atomic_write_text, read_json
from .paper import PaperRow, choose
from .session import ModelRun, RunOptions

OnSkip = Callable[[str], None]  # told "PATH: reason" for each unreadable image (None: it is an error)


@dataclass
class Report:
    """A benchmark's outcome on rank 0: ``result`` (the scores; or, with no references to score against, the
    ``predictions`` file for the evaluation server), whose ``notes`` are for people and whose ``skipped``
    counts the items left without a prediction; and the ``results.json`` written beside a model's work."""

    result: dict[str, Any]
    results: Path | None = None

    @property
    def skipped(self) -> int:
        return int(self.result.get("skipped", 0))

    @property
    def predictions_only(self) -> bool:
        return "predictions" in self.result


def run_vqa(benchmark: str, options: RunOptions, predictions: Path | None = None, questions: Path | None = None,
            annotations: Path | None = None, allow_missing: bool = False, legacy_lavis: bool = False,
            lemmatize: bool = False, on_skip: OnSkip | None = None) -> Report | None:
    """VQAv2 or OK-VQA (``benchmark``) accuracy with the official VQA algorithm. Without annotations, a model
    run gives its predictions only (test-dev). ``lemmatize`` (or the recipe's) lemmatises the predictions first."""
    from . import vqa_scoring
    from .data import vqa_items

    with ModelRun(options) as run:
        given = _zero_shot(benchmark, run, predictions, questions=questions, annotations=annotations)
        paper = _paper(benchmark, run)
        questions = _required(benchmark, "--questions", given["questions"])
        annotations = given["annotations"]
        if not (annotations is None and run.runs_model):  # test-dev: predictions for the server only
            annotations = _required(benchmark, "--annotations", annotations)
        predictions = _predictions(benchmark, predictions, run, lambda: vqa_items(questions, run.images),
                                   "question_id", "answer", on_skip, annotations, {"questions": questions})
        if predictions is None:
            return None
        if annotations is None:
            return _finish(_predictions_only(predictions), run, benchmark)
        allow_missing = allow_missing or run.skipped > 0
        if run.runs_model:
            lemmatize = lemmatize or run.settings(benchmark).lemmatize
        files = {"predictions": predictions, "questions": questions, "annotations": annotations}
        preds, qs, anns = (read_json(files["predictions"], lines_ok=True), read_json(files["questions"]),
                           read_json(files["annotations"]))
        if lemmatize:
            preds = lemmatized(preds)
        result = _naming_files(lambda: vqa_scoring.score_vqa(preds, anns, qs, allow_missing=allow_missing,
                                                             legacy_lavis=legacy_lavis), files)
        if lemmatize:
            result["notes"].append("predictions lemmatised first (spaCy en_core_web_sm nouns and verbs)")
        return _finish(result, run, benchmark, paper)


def lemmatized(predictions: Any) -> Any:
    """VQA predictions with their answers' nouns and verbs lemmatised (spaCy en_core_web_sm), as LAVIS does for
    OK-VQA; anything but a list of ``{answer: str}`` is returned as it is, for the scorer to refuse."""
    from .vqa_scoring import lemmatize

    if not (isinstance(predictions, list) and all(isinstance(p, dict) and isinstance(p.get("answer"), str)
                                                  for p in predictions)):
        return predictions
    lemmas = lemmatize([p["answer"] for p in predictions])
    return [{**p, "answer": lemma} for p, lemma in zip(predictions, lemmas)]


def run_gqa(options: RunOptions, predictions: Path | None = None, questions: Path | None = None,
            allow_missing: bool = False, on_skip: OnSkip | None = None) -> Report | None:
    """GQA accuracy: exact match after the VQA answer normalisation of both sides."""
    from . import vqa_scoring
    from .data import gqa_items

    with ModelRun(options) as run:
        given = _zero_shot("gqa", run, predictions, questions=questions)
        questions = _required("gqa", "--questions", given["questions"])
        paper = _paper("gqa", run)
        predictions = _predictions("gqa", predictions, run, lambda: gqa_items(questions, run.images), "question_id",
                                   "answer", on_skip, inputs={"questions": questions})
        if predictions is None:
            return None
        files = {"predictions": predictions, "questions": questions}
        preds, qs = read_json(files["predictions"], lines_ok=True), read_json(files["questions"])
        allow = allow_missing or run.skipped > 0
        result = _naming_files(lambda: vqa_scoring.score_gqa(preds, qs, allow_missing=allow), files)
        return _finish(result, run, "gqa", paper)


def run_captions(benchmark: str, options: RunOptions, predictions: Path | None = None,
                 annotations: Path | None = None, spice: bool = True, allow_missing: bool = False,
                 subsets: Path | None = None, on_skip: OnSkip | None = None) -> Report | None:
    """COCO or NoCaps (``benchmark``) captioning metrics as COCOEvalCap computes them, overall and per subset
    (``subsets``: a JSON file, see ``read_subsets``; NoCaps defaults to its images' domains). Without
    references, a model run over ``options.items`` gives its predictions only (a test split)."""
    from . import caption_scoring
    from .data import caption_items

    with ModelRun(options) as run:
        given = _zero_shot(benchmark, run, predictions, annotations=annotations, items=run.items)
        annotations, run.items = given["annotations"], given["items"]
        paper = _paper(benchmark, run, printed_per_unit=100)  # the paper prints the metrics x 100
        if not (annotations is None and run.runs_model and run.items is not None):  # a test split: no references
            annotations = _required(benchmark, "--annotations", annotations)
        predictions = _predictions(benchmark, predictions, run,
                                   lambda: caption_items(annotations, run.images, run.items), "image_id", "caption",
                                   on_skip, annotations, {"annotations": annotations, "items": run.items})
        if predictions is None:
            return None
        if annotations is None:
            return _finish(_predictions_only(predictions), run, benchmark)
        allow_missing = allow_missing or run.skipped > 0
        files = {"predictions": predictions, "annotations": annotations}
        preds, anns = read_json(files["predictions"], lines_ok=True), read_json(files["annotations"])
        groups = caption_scoring.domain_subsets(anns) if benchmark == "nocaps" else None
        if subsets is not None:
            groups = read_subsets(subsets)
        result = _naming_files(lambda: caption_scoring.score_captions(preds, anns, spice, subsets=groups,
                                                                      allow_missing=allow_missing), files)
        return _finish(result, run, benchmark, paper)


def read_subsets(path: Path) -> dict[str, set]:
    """A JSON object: subset name -> list of image ids."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(ids, list) and all(isinstance(i, (int, str)) for i in ids)
                                             for ids in data.values()):
        raise Blip2Error(f"{path}: expected a JSON object mapping each subset name to a list of image ids")
    return {str(name): set(ids) for name, ids in data.items()}


def run_retrieval(benchmark: str, options: RunOptions, annotations: Path | None = None, k: int | None = None,
                  batch_size: int | None = None) -> Report | None:
    """Flickr30K or COCO (``benchmark``: flickr30k, coco-retrieval) image-text retrieval: ITC for all pairs, the
    top ``k`` re-ranked by ITM; recall at 1, 5 and 10 both ways. Every image must be readable: the unreadable
    ones are all named in one error before anything runs."""
    from ..runtime import dist
    from .data import check_image_root, retrieval_items, unreadable_images
    from .retrieval import RetrievalEval, recall_metrics, retrieval_scores

    with ModelRun(options) as run:
        spec = run.settings(benchmark, RetrievalEval)
        annotations = run.apply_zero_shot(benchmark, spec.zero_shot, True, {"annotations": annotations})["annotations"]
        paper = choose(spec.paper, run.paper, run.model, benchmark)
        annotations = _required(benchmark, "--annotations", annotations)
        if run.model is None or run.images is None:
            protocol = ", or --zero-shot" if spec.zero_shot.model else ""
            raise Blip2Error(f"eval {benchmark}: give --model (an ITM checkpoint, e.g. blip2-itm-vit-g-coco) and "
                             f"--images{protocol}")
        images, texts, img2txt, txt2img = retrieval_items(annotations, run.images)
        check_image_root(run.images, run.images_hint)
        bad = unreadable_images(images)
        if bad:
            raise Blip2Error(f"{len(bad)} of {len(images)} images cannot be read, and retrieval ranks every text "
                             f"against every image, so nothing was run: {'; '.join(bad)}")
        k, batch_size = k or spec.k, batch_size or spec.batch_size
        out = run.prepare(benchmark, "retrieval scores", {"k": k}, {"annotations": annotations})
        model = run.load()
        run.start()
        scores = retrieval_scores(model, images, texts, k=k, batch_size=batch_size, work_dir=out, settings=spec)
        if dist.rank() != 0:
            return None
        result = {**recall_metrics(scores, img2txt, txt2img), "k": k, "num_images": len(images),
                  "num_texts": len(texts)}
        return _finish(result, run, benchmark, paper)


# --------------------------------------------------------------------------- shared steps


def _zero_shot(command: str, run: ModelRun, predictions: Path | None, **files: Path | None) -> dict[str, Path | None]:
    """``run.apply_zero_shot`` with the generation recipe's protocol (read only under ``--zero-shot``)."""
    protocol = run.settings(command).zero_shot if run.zero_shot else None
    return run.apply_zero_shot(command, protocol, predictions is None, files)


def _paper(command: str, run: ModelRun, printed_per_unit: float = 1.0) -> PaperRow | None:
    """The paper's row to compare with, from the generation recipe's figures (checked before any model runs)."""
    return choose(run.settings(command).paper, run.paper, run.model, command, printed_per_unit)


def _required(command: str, option: str, path: Path | None) -> Path:
    if path is None:
        raise Blip2Error(f"eval {command}: {option} FILE is required")
    return path


def _predictions(command: str, predictions: Path | None, run: ModelRun, make_items, key: str, field: str,
                 on_skip: OnSkip | None, references: Path | None = None, inputs: dict[str, Path | None] | None = None
                 ) -> Path | None:
    """The predictions file to score: the given one, or one made by running ``run.model``.

    Returns None on ranks other than 0, which only help to predict. Items whose image cannot be read get no
    prediction: each such image is passed to ``on_skip`` and counted in ``run.skipped``. The ``references``
    scored afterwards must exist before the model runs. ``inputs`` (the files the items come from) are recorded
    with the model and settings in the run's ``provenance.json``.
    """
    from .data import check_image_root, check_some_images

    if predictions is not None:
        if run.runs_model:
            raise Blip2Error(f"eval {command}: give --predictions or --model, not both")
        return predictions
    if not run.runs_model:
        raise Blip2Error(f"eval {command}: give --model (with --images) to run a model, or --predictions FILE "
                         "(or --zero-shot for the paper's protocol)")
    if run.images is None:
        raise Blip2Error(f"eval {command}: --model needs --images, the benchmark's image root")
    items = make_items()
    check_image_root(run.images, run.images_hint)
    check_some_images([it.image for it in items], run.images)
    if references is not None and not references.exists():
        raise Blip2Error(f"{references}: no such file (--annotations)")
    from ..runtime import dist
    from .generation import predict

    model = run.load()  # first: a VQA fine-tune decodes with its own prompt (``GenerationEval.for_model``)
    settings = run.settings(command).for_model(model.reads_questions)
    out = run.prepare(command, "predictions", settings.provenance(), inputs or {})
    run.start()
    path = predict(model, items, settings, out, key, field, on_skip=on_skip)
    if dist.rank() != 0:
        return None
    run.skipped = len({it.id for it in items}) - len(read_json(path))
    return path


def _naming_files(score: Callable[[], dict], files: dict[str, Path]) -> dict:
    """Run a scorer; its errors about "predictions: ..." or "annotations: ..." name the user's file instead."""
    try:
        return score()
    except Blip2Error as e:
        what, sep, rest = str(e).partition(": ")
        if sep and what in files:
            raise Blip2Error(f"{files[what]}: {rest}") from None
        raise


def _predictions_only(path: Path) -> dict:
    path = path.resolve()
    return {"predictions": str(path), "notes": [f"no annotations given: predictions only, in the official results "
                                                f"format for the evaluation server: {path}"]}


def _finish(result: dict, run: ModelRun, command: str, paper: PaperRow | None = None) -> Report:
    """The result with the run's notes, skipped items and the ``paper`` row's figures; a model's result is kept
    beside its predictions in ``results.json``, with the benchmark and the model (``ModelRun.model_summary``)."""
    result["notes"] = [*run.notes, *result.get("notes", [])]
    if run.skipped:
        result["skipped"] = run.skipped
        result["notes"].append(f"{run.skipped} item(s) have no prediction: their images could not be read (each "
                               "named above); the scores cover the rest, and a rerun predicts only those")
    if paper is not None and "predictions" not in result:
        result["paper"] = paper.compare(result)
    results = None
    if "predictions" not in result and run.runs_model:
        results = run.run_dir(command) / "results.json"
        atomic_write_text(results, json.dumps({**result, "benchmark": command, "model": run.model_summary()},
                                               indent=2))
    return Report(result, results)
