"""Name resolution: hub ids through the Hugging Face cache (offline), run directories, registry errors."""

from __future__ import annotations

import shutil

import pytest

import blip2cli
from blip2cli.errors import Blip2Error
from blip2cli.models import checkpoints, registry


def test_hub_id_loads_from_the_offline_cache(hf_opt, image_files, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--blip2-opt" / "snapshots" / "0123abcd"
    shutil.copytree(hf_opt, snapshot)
    (cache / "models--tiny-org--blip2-opt" / "refs").mkdir()
    (cache / "models--tiny-org--blip2-opt" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    from_hub = blip2cli.load("tiny-org/blip2-opt", device="cpu", dtype="float32")
    local = blip2cli.load(str(hf_opt), device="cpu", dtype="float32")
    kw = dict(num_beams=2, max_new_tokens=4)
    assert from_hub.generate(image_files[:2], **kw) == local.generate(image_files[:2], **kw)


def test_run_directory_loads_its_latest_checkpoint(hf_t5, image_files, tmp_path):
    blip = blip2cli.load(str(hf_t5), device="cpu", dtype="float32")
    run = tmp_path / "runs" / "stage2"
    checkpoints.save(blip.checkpoint, run / "step-000010")
    (run / "latest").symlink_to("step-000010")
    again = blip2cli.load(str(run), device="cpu", dtype="float32")
    kw = dict(num_beams=3, max_new_tokens=4)
    assert again.generate(image_files[:2], **kw) == blip.generate(image_files[:2], **kw)


def test_towers_and_llms_are_not_blip2_models():
    with pytest.raises(Blip2Error, match="not a BLIP-2 model"):
        blip2cli.load("eva-g", device="cpu")


def test_every_registry_generation_recipe_exists():
    from blip2cli.api import Decoding
    from blip2cli.config import load_recipe

    for entry in registry.ENTRIES:
        if entry.generation:
            decoding = load_recipe(Decoding, f"generate/{entry.generation}")
            assert decoding.num_beams == 5  # the paper decodes with beam 5 throughout


def test_recipe_errors_are_one_line():
    from blip2cli.api import Decoding
    from blip2cli.config import load_recipe

    with pytest.raises(Blip2Error, match="unknown key 'num_beam'; did you mean 'num_beams'"):
        load_recipe(Decoding, "generate/vqa", ["num_beam=3"])
    with pytest.raises(Blip2Error, match="expected int"):
        load_recipe(Decoding, "generate/vqa", ["num_beams=many"])
    assert load_recipe(Decoding, "generate/vqa", ["length_penalty=0"]).length_penalty == 0.0
