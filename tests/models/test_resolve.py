"""Name resolution: hub ids through the Hugging Face cache (offline), run directories, registry errors."""

from __future__ import annotations

import shutil

import torch

import pytest

import blip2cli
from blip2cli.runtime.errors import Blip2Error
from blip2cli.models import components, registry
from blip2cli.models.formats import native


def fake_hub_cache(monkeypatch, root, repos: dict[str, object]) -> None:
    """A Hugging Face cache holding ``repos`` (id -> directory), used offline."""
    import huggingface_hub.constants as hub_constants

    cache = root / "hub"
    for repo, src in repos.items():
        base = cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(src, base / "snapshots" / "0123abcd")
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def test_hub_id_loads_from_the_offline_cache(hf_opt, image_files, tmp_path, monkeypatch):
    fake_hub_cache(monkeypatch, tmp_path, {"tiny-org/blip2-opt": hf_opt})
    from_hub = blip2cli.load("tiny-org/blip2-opt", device="cpu", dtype="float32")
    local = blip2cli.load(str(hf_opt), device="cpu", dtype="float32")
    kw = dict(num_beams=2, max_new_tokens=4)
    assert from_hub.generate(image_files[:2], **kw) == local.generate(image_files[:2], **kw)


def test_run_directory_loads_its_latest_checkpoint(hf_t5, image_files, tmp_path):
    blip = blip2cli.load(str(hf_t5), device="cpu", dtype="float32")
    run = tmp_path / "runs" / "stage2"
    native.save(blip.checkpoint, run / "step-000010")
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


def test_training_checkpoints_refer_to_a_fetchable_llm(hf_opt, tmp_path, monkeypatch):
    """A stage-2 checkpoint stores the frozen LLM by name when it can be fetched again, not by value."""
    from safetensors.torch import load_file

    from blip2cli.config import load_recipe
    from blip2cli.train.build import build_stage1, build_stage2
    from blip2cli.train.recipe import PretrainRecipe

    lm_dir = tmp_path / "opt-lm"
    source = blip2cli.load(str(hf_opt), device="cpu", dtype="float32")
    source.net.language_model.model.save_pretrained(lm_dir)
    source.checkpoint.tokenizer.save_pretrained(lm_dir)
    fake_hub_cache(monkeypatch, tmp_path, {"tiny-org/opt-lm": lm_dir})
    _, first = build_stage1(load_recipe(PretrainRecipe, "tiny/stage1"))
    native.save(first, tmp_path / "stage1")
    task, ckpt = build_stage2(load_recipe(PretrainRecipe, "tiny/stage2", ["model.llm=tiny-org/opt-lm"]),
                              str(tmp_path / "stage1"), tmp_path)
    native.save(ckpt, tmp_path / "stage2")
    saved = load_file(tmp_path / "stage2" / "model.safetensors")
    assert not any(k.startswith("language_model.") for k in saved)
    assert any(k.startswith("vision.") for k in saved)  # the tiny tower has no source: stored by value
    again = native.load_ours(tmp_path / "stage2")
    assert again.frozen_sources == {"language_model": "tiny-org/opt-lm"}
    ours = again.net.language_model.model.state_dict()
    for k, v in source.net.language_model.model.state_dict().items():
        torch.testing.assert_close(ours[k], v)
    torch.testing.assert_close(again.net.qformer.query_tokens, task.net.qformer.query_tokens)


def test_registry_tower_comes_from_the_cache_and_is_saved_by_reference(tmp_path, monkeypatch):
    """``vision: eva-g`` reads LAVIS's eva_vit_g.pth (here a tiny stand-in in $BLIP2_CACHE), drops the
    tower's last block, and checkpoints name the tower instead of storing it."""
    from dataclasses import replace

    from safetensors.torch import load_file
    from timm.models.eva import Eva

    from blip2cli.config import load_recipe
    from blip2cli.train.build import build_stage1
    from blip2cli.train.recipe import PretrainRecipe

    tiny_eva = replace(components.TOWERS["eva-g"], image_size=64, patch_size=8, width=64, layers=2, heads=4, mlp_dim=128)
    monkeypatch.setitem(components.TOWERS, "eva-g", tiny_eva)
    torch.manual_seed(3)
    full = Eva(img_size=64, patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0, num_classes=0)
    torch.save(full.state_dict(), tmp_path / "eva_vit_g.pth")  # a raw tower file, 3 blocks, as LAVIS ships it
    monkeypatch.setenv("BLIP2_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, ckpt = build_stage1(load_recipe(PretrainRecipe, "tiny/stage1", ["model.vision=eva-g"]))
    assert len(ckpt.net.vision.trunk.blocks) == 2
    torch.testing.assert_close(ckpt.net.vision.trunk.blocks[1].mlp.fc1.weight, full.blocks[1].mlp.fc1.weight)
    native.save(ckpt, tmp_path / "s1")
    assert not any(k.startswith("vision.") for k in load_file(tmp_path / "s1" / "model.safetensors"))
    again = native.load_ours(tmp_path / "s1")
    torch.testing.assert_close(again.net.vision.trunk.pos_embed, full.pos_embed)
    (tmp_path / "eva_vit_g.pth").unlink()
    with pytest.raises(Blip2Error, match="eva_vit_g.pth is not cached"):
        native.load_ours(tmp_path / "s1")
