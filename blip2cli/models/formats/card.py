"""The Hugging Face model card (``README.md``) of an exported model, and its upload to the hub.

The card's metadata is built with ``huggingface_hub.ModelCardData``; its facts come only from files on this
machine: a hub model's cached card (license, datasets), a training run's ``recipe.yaml``, ``command.txt`` and
checkpoint (stage, step, data, ``--init``), and the eval runs beside that run whose model is this checkpoint
(``results.json``, or ``metrics.json`` with ``provenance.json``). What is not known is left out, never guessed.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...runtime.errors import Blip2Error
from ..assemble import Checkpoint

CARD_FILE = "README.md"
LICENCE_KEYS = ("license", "license_name", "license_link")

# eval benchmark -> (model-index task type, task name, dataset type, dataset name)
BENCHMARKS = {
    "coco": ("image-to-text", "Image Captioning", "coco", "COCO Captions"),
    "nocaps": ("image-to-text", "Image Captioning", "nocaps", "NoCaps"),
    "vqav2": ("visual-question-answering", "Visual Question Answering", "vqav2", "VQAv2"),
    "okvqa": ("visual-question-answering", "Visual Question Answering", "okvqa", "OK-VQA"),
    "gqa": ("visual-question-answering", "Visual Question Answering", "gqa", "GQA"),
    "flickr30k": ("image-text-retrieval", "Image-Text Retrieval", "flickr30k", "Flickr30K"),
    "coco-retrieval": ("image-text-retrieval", "Image-Text Retrieval", "coco", "COCO"),
}
# metric key as `blip2 eval --json` prints it -> (metric type, shown name, factor to the percent scale)
METRICS: dict[str, tuple[str, str, float]] = {
    "accuracy": ("accuracy", "accuracy", 1),
    "CIDEr": ("cider", "CIDEr", 100), "Bleu_4": ("bleu", "BLEU-4", 100), "METEOR": ("meteor", "METEOR", 100),
    "ROUGE_L": ("rouge", "ROUGE-L", 100), "SPICE": ("spice", "SPICE", 100),
    **{f"txt_r{n}": ("recall", f"image-to-text R@{n}", 1) for n in (1, 5, 10)},
    **{f"img_r{n}": ("recall", f"text-to-image R@{n}", 1) for n in (1, 5, 10)},
    "r_mean": ("recall", "mean recall", 1),
}
STAGES = {"stage1": "stage-1 pretraining (ITC, ITM, ITG)", "stage2": "stage-2 pretraining (language modelling)",
          "caption": "caption fine-tuning", "vqa": "VQA fine-tuning", "retrieval": "retrieval fine-tuning"}


@dataclass
class EvalRun:
    """The scores of one ``blip2 eval`` run directory."""

    benchmark: str
    metrics: dict[str, float]
    where: Path


@dataclass
class Origin:
    """Where a model comes from, as far as this machine's files tell."""

    lines: list[str]  # markdown bullets for "How it was made"
    base_model: str | None = None  # a hub id
    licence: dict[str, str] = field(default_factory=dict)  # license, license_name, license_link
    licence_note: str = ""
    datasets: list[str] = field(default_factory=list)
    stage: str | None = None
    evals: list[EvalRun] = field(default_factory=list)


# --------------------------------------------------------------------------- facts


def origin(model: str) -> Origin:
    """What the ``convert`` argument ``model`` (already loaded, so valid) designates, resolved as loading does."""
    from ...runtime.rundir import step_of
    from .. import registry
    from ..resolve import resolve_path

    path = Path(model).expanduser()
    if path.exists() or path.is_symlink():
        real = resolve_path(path).resolve()
        if step_of(real) is not None and (real.parent / "recipe.yaml").is_file():
            return training_run(real)
        if real.is_file():
            entry = next((e for e in registry.ENTRIES if e.source.startswith("lavis:")
                          and e.where.rsplit("/", 1)[-1] == real.name), None)
            return _lavis(entry, f"Converted from the LAVIS checkpoint `{real}`")
        card = read_card(real / CARD_FILE)
        found = Origin([f"Converted from the local directory `{real}`."], licence=licence_of(card))
        if card is not None:
            base = card.data.get("base_model")
            found.base_model = base if isinstance(base, str) else None
            found.licence_note = f"From the card in {real}." if found.licence else ""
        return found
    entry = registry.lookup(model)
    if entry is not None and entry.source.startswith("lavis:"):
        return _lavis(entry, f"Converted from the registry model `{entry.name}`")
    repo = entry.where if entry is not None else model
    card = hub_card(repo)
    found = Origin([f"Converted from [{repo}](https://huggingface.co/{repo})."], base_model=repo,
                   licence=licence_of(card))
    if card is not None:
        found.datasets = _strings(card.data.get("datasets"))
        found.licence_note = f"From the card of {repo}." if found.licence else ""
    return found


def _lavis(entry: Any, line: str) -> Origin:
    """A LAVIS ``.pth``: its registry entry names the original checkpoint; LAVIS files carry no license."""
    if entry is not None:
        line += f", the LAVIS checkpoint {entry.where} ({entry.description})"
    return Origin([line + "."])


def training_run(step: Path) -> Origin:
    """A checkpoint of a blip2 training run: its stage, step, recipe and data, the model it started from (the
    ``--init`` of ``command.txt``) and the eval runs of this checkpoint beside the run."""
    run = step.parent
    recipe = _read(run / "recipe.yaml", yaml=True)
    meta = _read(step / "blip2.json")
    commands = [line for line in _text(run / "command.txt").splitlines() if line.strip()]
    stage = meta.get("stage") or recipe.get("stage")
    train, data, model = (recipe.get(k) if isinstance(recipe.get(k), dict) else {} for k in ("train", "data", "model"))
    total = f" of {train['steps']}" if train.get("steps") else ""
    lines = [f"Trained with blip2, run `{run.name}`: {STAGES.get(stage, stage or 'training')}, checkpoint "
             f"`{step.name}` (step {meta.get('step', int(step.name[5:]))}{total})."]
    if train or data:
        lines.append(f"Recipe (`recipe.yaml` of the run): batch {data.get('batch_size')} per device, learning rate "
                     f"{(recipe.get('optim') or {}).get('lr')}, precision {train.get('precision')}, image size "
                     f"{model.get('image_size')} px.")
    sources = [s for s in data.get("sources") or [] if isinstance(s, dict)]
    if sources:
        lines.append("Data: " + "; ".join(_source(s) for s in sources) + ".")
    for part, what in (("vision", "Frozen image encoder"), ("llm", "Frozen language model")):
        if isinstance(model.get(part), str) and model[part]:
            lines.append(f"{what}: `{model[part]}`.")
    init = _option(commands, "--init")
    found = Origin(lines, stage=stage)
    if init:
        found.lines.append(f"Started from `{init}` (its `--init`).")
        found.base_model = _hub_id(init, run)
        base = hub_card(found.base_model) if found.base_model else None
        found.licence = licence_of(base)
        found.licence_note = f"The license of the base model `{init}` applies."
    if commands:
        found.lines.append("Command lines (`command.txt`):\n\n```bash\n" + "\n".join(commands) + "\n```")
    found.evals = find_evals(run.parent, step)
    return found


def _source(s: dict[str, Any]) -> str:
    where = s.get("path") or (f"{s.get('size')} renderings" if s.get("size") else "")
    weight = f", weight {s['weight']:g}" if isinstance(s.get("weight"), (int, float)) else ""
    return f"{s.get('kind')} `{where}`{weight}" if where else f"{s.get('kind')}{weight}"


def _option(commands: list[str], name: str) -> str | None:
    """The value of ``name`` in the first command line that has it (``--name VALUE`` or ``--name=VALUE``)."""
    for line in commands:
        try:
            words = shlex.split(line)
        except ValueError:
            words = line.split()
        for i, word in enumerate(words):
            if word == name and i + 1 < len(words):
                return words[i + 1]
            if word.startswith(name + "="):
                return word[len(name) + 1:]
    return None


def _hub_id(init: str, run: Path) -> str | None:
    """The hub id an ``--init`` value names (a registry hf: entry or an id), None for a local path or LAVIS file.

    A relative path was relative to where training ran (normally the parent of the runs directory)."""
    from .. import registry
    from ..hub import is_hub_id

    entry = registry.lookup(init)
    if entry is not None:
        return entry.where if entry.source.startswith("hf:") else None
    local = Path(init).expanduser()
    if (local.is_absolute() or init.startswith(".") or local.parts[0] == run.parent.name
            or (run.parent.parent / local).exists() or local.exists()):
        return None
    return init if is_hub_id(init) else None


def find_evals(runs: Path, checkpoint: Path) -> list[EvalRun]:
    """The eval runs in ``runs`` whose model is ``checkpoint`` (a real path): each run's ``results.json``, or its
    ``metrics.json`` with the model and benchmark of its ``provenance.json``."""
    found = []
    for where in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []:
        metrics = described = _read(where / "results.json")
        if not metrics:
            metrics, made_by = _read(where / "metrics.json"), _read(where / "provenance.json").get("made_by")
            described = made_by if isinstance(made_by, dict) else {}
        model, benchmark = described.get("model"), described.get("benchmark")
        source = model.get("source") if isinstance(model, dict) else None
        if benchmark in BENCHMARKS and isinstance(source, str) and Path(source).resolve() == checkpoint:
            scores = {k: float(v) for k, v in metrics.items()
                      if k in METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if scores:
                found.append(EvalRun(benchmark, scores, where))
    return found


def hub_card(repo: str):
    """The cached ``README.md`` of hub repository ``repo`` as a ``ModelCard``; fetched only when not offline."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from ...runtime.download import offline

    path = try_to_load_from_cache(repo, CARD_FILE)
    if not isinstance(path, str) and not offline():
        try:
            path = hf_hub_download(repo, CARD_FILE)
        except Exception:  # no card, no network: the card says less
            path = None
    return read_card(Path(path)) if isinstance(path, str) else None


def read_card(path: Path):
    """A ``ModelCard`` read from ``path``, or None where there is none or it cannot be parsed."""
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path, ignore_metadata_errors=True) if path.is_file() else None
    except Exception:
        return None


def licence_of(card: Any) -> dict[str, str]:
    """``license`` (and ``license_name``, ``license_link``) of a card's metadata."""
    if card is None:
        return {}
    return {k: v for k in LICENCE_KEYS if isinstance(v := card.data.get(k), str) and v}


def _strings(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [v for v in value or [] if isinstance(v, str)]


def _read(path: Path, yaml: bool = False) -> dict[str, Any]:
    """A JSON (or YAML) object from ``path``; ``{}`` where missing or unreadable."""
    text = _text(path)
    if not text:
        return {}
    try:
        if yaml:
            import yaml as pyyaml

            data = pyyaml.safe_load(text)
        else:
            data = json.loads(text)
    except ValueError:  # json.JSONDecodeError and yaml.YAMLError are both ValueErrors
        return {}
    return data if isinstance(data, dict) else {}


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


# --------------------------------------------------------------------------- the card


def model_card(ckpt: Checkpoint, model: str, out: Path, fmt: str = "hf", repo_id: str | None = None):
    """The ``ModelCard`` of ``ckpt`` (loaded from ``model``) exported to ``out`` in format ``fmt`` (hf, blip2);
    ``repo_id``: the hub repository it is uploaded to, named in the usage snippets."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    cfg = ckpt.config
    src = origin(model)
    task = ("retrieval" if cfg.text is None else
            "vqa" if cfg.qformer_text_input or src.stage == "vqa" or (ckpt.generation or "").startswith("vqa-")
            else "caption")
    pipeline, tags = {"retrieval": ("zero-shot-image-classification", ["image-text-retrieval"]),
                      "vqa": ("visual-question-answering", ["visual-question-answering"]),
                      "caption": ("image-to-text", ["image-captioning"])}[task]
    name = (repo_id or str(out)).rstrip("/").rsplit("/", 1)[-1]
    results = [EvalResult(task_type=t, task_name=tn, dataset_type=dt, dataset_name=dn, metric_type=METRICS[k][0],
                          metric_name=METRICS[k][1], metric_value=round(v * METRICS[k][2], 2))
               for run in src.evals for t, tn, dt, dn in [BENCHMARKS[run.benchmark]] for k, v in run.metrics.items()]
    data = ModelCardData(
        library_name="transformers" if fmt == "hf" else None, pipeline_tag=pipeline,
        tags=["blip-2", *tags, *(["instructblip"] if cfg.qformer_text_input and fmt == "hf" else [])],
        base_model=src.base_model, datasets=src.datasets or None, model_name=name if results else None,
        eval_results=results or None,
        **src.licence)
    body = [f"# {name}", "", _summary(task, fmt, ckpt), "", "## Model", "", *_architecture(ckpt), "",
            "## How it was made", "", *(f"- {line}" for line in src.lines), "", "## License", "",
            _licence_text(src), "", "## How to use", "", *_usage(task, fmt, cfg, repo_id or str(out))]
    if src.evals:
        body += ["", "## Evaluation", "", *_eval_table(src.evals)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def _summary(task: str, fmt: str, ckpt: Checkpoint) -> str:
    from ...runtime import __version__

    what = {"retrieval": "a BLIP-2 image-text retrieval model (Q-Former with ITM and ITC heads, no language model)",
            "vqa": "a BLIP-2 visual question answering model", "caption": "a BLIP-2 image-to-text model"}[task]
    how = "the transformers format" if fmt == "hf" else "blip2's own checkpoint format"
    return f"This is {what}, written in {how} by `blip2 convert` (blip2 {__version__})."


def _architecture(ckpt: Checkpoint) -> list[str]:
    cfg = ckpt.config
    v, q, text = cfg.vision, cfg.qformer, cfg.text
    tower = {"eva": "EVA ViT", "clip": "CLIP ViT"}.get(v.kind, v.kind)
    lines = [f"- Image encoder: {tower}, {v.layers} layers of width {v.width}, patch {v.patch_size}, "
             f"{v.image_size}x{v.image_size} px images.",
             f"- Q-Former: {q.num_layers} layers of width {q.hidden_size}, {q.num_query_tokens} learned queries"
             + (", reading the question too (InstructBLIP layout)." if cfg.qformer_text_input else ".")]
    if text is None:
        lines.append(f"- No language model: image-text matching and contrastive heads ({cfg.embed_dim}-d embeddings).")
    else:
        layers = text.get("num_hidden_layers") or text.get("num_layers")
        width = text.get("hidden_size") or text.get("d_model")
        named = text.get("_name_or_path") or ""
        lines.append(f"- Language model: {text.get('model_type')}{f' ({named})' if named else ''}, {layers} layers "
                     f"of width {width}, vocabulary {text.get('vocab_size')}.")
    params = sum(p.numel() for p in ckpt.net.parameters())
    lines.append(f"- Parameters: {params / 1e6:,.1f} M in all.")
    return lines


def _licence_text(src: Origin) -> str:
    if src.licence.get("license"):
        named = [src.licence[k] for k in ("license_name", "license_link") if k in src.licence]
        said = f"`{src.licence['license']}`" + (f" ({', '.join(named)})" if named else "")
        return f"License: {said}. {src.licence_note}".strip()
    return (src.licence_note or "No license is recorded for this model.") + \
        " Check the licenses of the models it was made from."


def _usage(task: str, fmt: str, cfg: Any, repo: str) -> list[str]:
    if fmt != "hf":
        return ["With blip2:", "", "```bash", f"blip2 generate photo.jpg --model {repo}" if cfg.text is not None
                else f"python -c \"import blip2cli; print(blip2cli.load('{repo}').itm('photo.jpg', 'a dog'))\"",
                "```"]
    if task == "retrieval":
        code = ["from PIL import Image",
                "from transformers import AutoTokenizer, BlipImageProcessor, Blip2ForImageTextRetrieval", "",
                f'model = Blip2ForImageTextRetrieval.from_pretrained("{repo}")',
                f'images = BlipImageProcessor.from_pretrained("{repo}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
                'inputs = {**images(Image.open("photo.jpg"), return_tensors="pt"),',
                '          **tokenizer(["a dog on a sofa"], return_tensors="pt")}',
                "match = model(**inputs, use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]"]
        cli = f"python -c \"import blip2cli; print(blip2cli.load('{repo}').itm('photo.jpg', 'a dog on a sofa'))\""
    else:
        instruct = cfg.qformer_text_input
        model_class = "InstructBlipForConditionalGeneration" if instruct else "Blip2ForConditionalGeneration"
        processor = "InstructBlipProcessor" if instruct else "Blip2Processor"
        prompt = "Question: what is on the table? Answer:" if task == "vqa" else "a photo of"
        code = ["from PIL import Image", f"from transformers import {model_class}, {processor}", "",
                f'model = {model_class}.from_pretrained("{repo}")',
                f'processor = {processor}.from_pretrained("{repo}")',
                *([] if instruct else ["processor.num_query_tokens = model.config.num_query_tokens"]),
                f'inputs = processor(images=Image.open("photo.jpg"), text="{prompt}", return_tensors="pt")',
                "print(processor.batch_decode(model.generate(**inputs, max_new_tokens=30), skip_special_tokens=True))"]
        question = ' --prompt "what is on the table?"' if task == "vqa" else ""
        cli = f"blip2 generate photo.jpg{question} --model {repo}"
    return ["With transformers:", "", "```python", *code, "```", "", "With blip2:", "", "```bash", cli, "```"]


def _eval_table(evals: list[EvalRun]) -> list[str]:
    rows = ["| Benchmark | Metric | Score | Eval run |", "|---|---|---|---|"]
    for run in evals:
        for key, value in run.metrics.items():
            rows.append(f"| {BENCHMARKS[run.benchmark][3]} | {METRICS[key][1]} | {value * METRICS[key][2]:.2f} | "
                        f"`{run.where.name}` |")
    return [*rows, "", "Scores by `blip2 eval`, in percent (the captioning metrics x100)."]


# --------------------------------------------------------------------------- writing and uploading


def export(ckpt: Checkpoint, out: Path, fmt: str, card: Any) -> None:
    """Write ``ckpt`` to ``out`` in format ``fmt`` with ``card`` as its README.md, in one atomic directory write."""
    from .hf import export_hf
    from .native import save

    (export_hf if fmt == "hf" else save)(ckpt, out, add_files=lambda tmp: card.save(tmp / CARD_FILE))


def push(folder: Path, repo_id: str, private: bool, message: str) -> str:
    """Upload ``folder`` to the hub model repository ``repo_id`` (created if missing); returns its URL. Every
    failure is one line saying that the export is complete and how to retry the upload."""
    from huggingface_hub import HfApi, get_token

    from ...runtime.download import offline

    retry = (f"the export in {folder} is complete; upload it later with `hf upload {repo_id} {folder}"
             f"{' --private' if private else ''}`")
    if offline():
        raise Blip2Error(f"cannot upload to {repo_id}: offline (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or "
                         f"BLIP2_OFFLINE is set); {retry}")
    if get_token() is None:
        raise Blip2Error(f"cannot upload to {repo_id}: no Hugging Face token (run `hf auth login` or set HF_TOKEN); "
                         f"{retry}")
    print(f"uploading {folder} to {repo_id} on the Hugging Face hub", file=sys.stderr, flush=True)
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=message)
    except Exception as e:  # HTTP, network, file and token errors alike: the export stands, the upload can be redone
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise Blip2Error(f"upload to {repo_id} failed ({first}); {retry}") from None
    url = f"https://huggingface.co/{repo_id}"
    print(f"uploaded to {url}", file=sys.stderr)
    return url
