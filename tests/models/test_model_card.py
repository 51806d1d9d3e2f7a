"""``blip2 convert`` writes a Hugging Face model card (README.md) with the export, and ``--push-to-hub`` uploads it.

One tiny model (``hf_opt``) for the module: it stands in a fake offline hub cache as ``tiny-org/blip2-opt`` (with a
card saying ``license: mit``), and, saved in blip2's format, as the checkpoint of a training run started from it
(``--init tiny-org/blip2-opt``) with eval runs beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from blip2cli.cli.app import main
from blip2cli.config import load_recipe, to_dict
from blip2cli.models.formats import native
from blip2cli.train.recipe import PretrainRecipe

from tests.models.test_resolve import fake_hub_cache

HUB_ID = "tiny-org/blip2-opt"
RECIPE = "finetune/caption_coco_opt-2.7b"
SOURCE = "data/coco/annotations/coco_karpathy_train.json"  # that recipe's data


@pytest.fixture(scope="module")
def runs(opt, tmp_path_factory) -> Path:
    """``runs/`` with a training run (``tiny-caption``, its ``latest`` the step-000004 checkpoint) and eval runs:
    a results.json and a metrics.json + provenance.json of that checkpoint, a results.json of another model."""
    root = tmp_path_factory.mktemp("card") / "runs"
    run = root / "tiny-caption"
    step = run / "step-000004"
    native.save(opt.checkpoint, step, extra={"step": 4, "stage": "caption"})
    (run / "latest").symlink_to(step.name)
    (run / "recipe.yaml").write_text(yaml.safe_dump(to_dict(load_recipe(PretrainRecipe, RECIPE)), sort_keys=False))
    (run / "command.txt").write_text(f"blip2 finetune caption --init {HUB_ID} --recipe {RECIPE} --name tiny-caption\n")
    real = str(step.resolve())
    write_eval(root / "vqav2-tiny-caption-step-000004", "results.json",
               {"accuracy": 61.25, "num_questions": 8, "benchmark": "vqav2",
                "model": {"label": "tiny-caption-step-000004", "source": real}})
    write_eval(root / "coco-tiny-caption-step-000004", "metrics.json", {"CIDEr": 1.2345, "Bleu_4": 0.5, "notes": []})
    write_eval(root / "coco-tiny-caption-step-000004", "provenance.json",
               {"format": "blip2-eval-provenance", "version": 1,
                "made_by": {"benchmark": "coco", "model": {"source": real, "weights": "0" * 64}}})
    write_eval(root / "vqav2-other", "results.json",
               {"accuracy": 12.5, "benchmark": "vqav2", "model": {"label": "other", "source": str(root / "other")}})
    return root


def write_eval(directory: Path, name: str, data: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(json.dumps(data))


@pytest.fixture
def hub(hf_opt, tmp_path, monkeypatch) -> None:
    """``tiny-org/blip2-opt`` in an offline Hugging Face cache, its card saying ``license: mit``."""
    source = tmp_path / "source"
    source.mkdir()
    for f in hf_opt.iterdir():
        (source / f.name).symlink_to(f)
    (source / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n\n# tiny\n")
    fake_hub_cache(monkeypatch, tmp_path, {HUB_ID: source})


def convert(*args: str | Path) -> int:
    """``blip2 convert ARGS`` through the real entry point, in this process; its exit status."""
    sys_argv = ["blip2", "convert", *map(str, args)]
    old, sys.argv = sys.argv, sys_argv
    try:
        main()
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = old
    return 0


def test_training_run_card_has_its_recipe_base_model_and_own_evals(runs, hub, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import Blip2ForConditionalGeneration

    out = tmp_path / "hf"
    assert convert(runs / "tiny-caption" / "latest", "--out", out, "--to", "hf") == 0
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-to-text"
    assert "blip-2" in data.tags and "image-captioning" in data.tags
    assert data.base_model == HUB_ID and data.license == "mit"  # the license of the --init model's cached card
    scores = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert scores[("vqav2", "accuracy")] == 61.25  # results.json
    assert scores[("coco", "cider")] == 123.45  # metrics.json + provenance.json; captions shown x100
    assert 12.5 not in scores.values() and "vqav2-other" not in card.text  # another model's eval
    assert SOURCE in card.text and "caption fine-tuning" in card.text and "step-000004" in card.text
    assert "Blip2ForConditionalGeneration.from_pretrained" in card.text and "blip2 generate" in card.text
    Blip2ForConditionalGeneration.from_pretrained(out)


def test_hub_source_card_carries_its_license_and_id(hub, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "hf"
    assert convert(HUB_ID, "--out", out) == 0
    data = ModelCard.load(out / "README.md").data
    assert data.license == "mit"
    assert data.base_model == HUB_ID
    assert data.eval_results is None


def test_push_to_hub_uploads_the_export(runs, hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "BLIP2_OFFLINE"):  # huggingface_hub's own switch
        monkeypatch.delenv(name, raising=False)  # stays on (``hub``): the base model's card is read from the cache
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    out = tmp_path / "hf"
    assert convert(runs / "tiny-caption", "--out", out, "--push-to-hub", "me/tiny", "--private") == 0
    assert calls["create"] == ("me/tiny", {"exist_ok": True, "private": True})
    assert calls["upload"]["repo_id"] == "me/tiny" and Path(calls["upload"]["folder_path"]) == out
    assert (out / "README.md").is_file()
    assert "uploaded to https://huggingface.co/me/tiny" in capsys.readouterr().err


def test_push_to_hub_offline_keeps_the_export_and_says_so(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hf"
    assert convert(runs / "tiny-caption", "--out", out, "--push-to-hub", "me/tiny") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error: ")
    assert len([line for line in lines if line.startswith("error")]) == 1
    assert f"export in {out} is complete" in lines[-1] and f"hf upload me/tiny {out}" in lines[-1]
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
