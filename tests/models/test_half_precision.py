"""Half precision on CPU for every way a model loads: a transformers directory, a model blip2 trained itself
(run directory, EVA-style timm tower with its k-bias buffers), a LAVIS file. Every tensor of the tower follows
the load dtype, the documented float32 parts stay float32, the LLM is what transformers makes of it in that
dtype, text comes out, and the logits stay near the float32 ones."""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path

import pytest
import torch

import blip2cli
from blip2cli.api import Blip2
from blip2cli.models.formats.lavis import load_lavis
from blip2cli.models.vision import VisionConfig

from tests import tiny
from tests.helpers import blip2
from tests.tiny import TINY_VIT, llm_dir, write_lavis

HALF = [torch.bfloat16, torch.float16]  # torch has CPU kernels for both
# README: ln_vision is computed in float32, the Q-Former and its queries stay float32
FLOAT32_PARTS = ("qformer.", "ln_vision.", "vision_proj.", "text_proj.", "itm_head.", "temp")
PROMPTS = ["", "a photo of", "what colour is it?", "the"]
TINY_CLIP = VisionConfig(kind="clip", image_size=tiny.IMAGE_SIZE, patch_size=8, width=32, layers=2, heads=4,
                         mlp_dim=128, layer_norm_eps=1e-5, quick_gelu=True)


@pytest.fixture(scope="module")
def shape_images(tmp_path_factory) -> list[Path]:
    from blip2cli.data.synthetic import ShapesDataset

    return ShapesDataset("heldout", size=4, image_size=64, seed=0).write_images(tmp_path_factory.mktemp("shapes"), 4)


def assert_follows(blip: Blip2, dtype: torch.dtype, reference_lm: torch.nn.Module | None) -> None:
    """Every floating tensor has the load dtype but the float32 parts; the tower's k-biases are among them; the
    LLM's tensors have the dtypes transformers gives the same LLM loaded in ``dtype``."""
    net = blip.net
    k_biases = 0
    for name, t in chain(net.named_parameters(), net.named_buffers()):
        if not t.is_floating_point() or name.startswith("language_model."):
            continue
        want = torch.float32 if name.startswith(FLOAT32_PARTS) else dtype
        assert t.dtype == want, f"{name}: {t.dtype}, expected {want}"
        k_biases += name.endswith("attn.k_bias")
    if net.config.vision.kind == "eva":
        assert k_biases == len(net.vision.trunk.blocks)  # timm's EVA blocks each hold one, as a buffer
    if reference_lm is None:
        return
    lm = net.language_model.model

    def dtypes(m):
        return {n: t.dtype for n, t in chain(m.named_parameters(), m.named_buffers()) if t.is_floating_point()}

    assert dtypes(lm) == dtypes(reference_lm)
    assert dtype in set(dtypes(lm).values())


def logits(blip: Blip2, images, prompts) -> torch.Tensor:
    tok = blip.checkpoint.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True)
    extra = {}
    if blip.net.language_model.is_encoder_decoder:
        extra["decoder_input_ids"] = torch.tensor([[0, 5, 6, 7]] * len(prompts))
    with torch.no_grad():
        out = blip.net(blip.pixel_values(images).to(blip.dtype), enc.input_ids, enc.attention_mask, **extra)
    return out.logits.float()


def assert_near(half: torch.Tensor, full: torch.Tensor, dtype: torch.dtype) -> None:
    """Loose: half-precision rounding through the tower and the LLM, nothing more (a wrong cast is far off)."""
    scale = full.abs().max().item()
    tol = 0.1 if dtype == torch.bfloat16 else 0.02
    assert scale > 1.0  # a real signal
    torch.testing.assert_close(half, full, atol=tol * scale, rtol=0)
    assert (half - full).abs().mean() < tol * full.std()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_transformers_directory_generates_in_half_precision(kind, dtype, hf_opt, hf_t5, image_files):
    from transformers import Blip2ForConditionalGeneration

    path = hf_opt if kind == "opt" else hf_t5
    half = blip2cli.load(str(path), device="cpu", dtype=dtype)
    reference = Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype).language_model
    assert_follows(half, dtype, reference)
    texts = half.generate(image_files[:4], PROMPTS, num_beams=3, max_new_tokens=5, min_new_tokens=2)
    assert all(texts) and len(texts) == 4
    full = blip2cli.load(str(path), device="cpu", dtype="float32")
    assert_near(logits(half, image_files[:4], PROMPTS), logits(full, image_files[:4], PROMPTS), dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_blip2_trained_model_generates_in_half_precision(dtype, trained_tiny, shape_images):
    from transformers import AutoModelForCausalLM

    model = str(trained_tiny / "runs" / "tiny-stage2" / "latest")
    half = blip2cli.load(model, device="cpu", dtype=dtype)
    assert_follows(half, dtype, AutoModelForCausalLM.from_pretrained(trained_tiny / "runs" / "tiny-llm", dtype=dtype))
    texts = half.generate(shape_images, PROMPTS, num_beams=3, max_new_tokens=5, min_new_tokens=2)
    assert all(texts) and len(texts) == 4
    full = blip2cli.load(model, device="cpu", dtype="float32")
    assert_near(logits(half, shape_images, PROMPTS), logits(full, shape_images, PROMPTS), dtype)


def with_clip_tower(pth: Path) -> None:
    """Swap a LAVIS file's EVA tower for a random open_clip ViT of the same width (LAVIS's ViT-L layout)."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    torch.manual_seed(0)
    clip = VisionTransformer(image_size=tiny.IMAGE_SIZE, patch_size=8, width=32, layers=TINY_CLIP.layers + 1, heads=4,
                             mlp_ratio=4.0, act_layer=QuickGELU, output_dim=16)
    tiny._randomise(clip, seed=6)
    raw = torch.load(pth, weights_only=True)
    model = {k: v for k, v in raw["model"].items() if not k.startswith("visual_encoder.")}
    model |= {f"visual_encoder.{k}": v for k, v in clip.state_dict().items()}
    torch.save({"model": model}, pth)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind, tower", [("opt", "eva"), ("t5", "eva"), ("opt", "clip")])
def test_lavis_file_generates_in_half_precision(kind, tower, dtype, hf_opt, hf_t5, image_files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    source = blip2cli.load(str(hf_opt if kind == "opt" else hf_t5), device="cpu", dtype="float32")
    pth = tmp_path / "blip2_tiny.pth"
    write_lavis(source, pth, kind)
    if tower == "clip":
        with_clip_tower(pth)
    lm = llm_dir(source, tmp_path / "llm")
    preset = TINY_CLIP if tower == "clip" else TINY_VIT

    def load(dt: torch.dtype) -> Blip2:
        ckpt = load_lavis(pth, llm=str(lm), vision=preset, qformer_heads=4, dtype=dt)
        assert ckpt.config.vision.kind == tower
        return Blip2(ckpt, torch.device("cpu"), dt)

    half = load(dtype)
    auto = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    assert_follows(half, dtype, auto.from_pretrained(lm, dtype=dtype))
    texts = half.generate(image_files[:4], PROMPTS, num_beams=3, max_new_tokens=5, min_new_tokens=2)
    assert all(texts) and len(texts) == 4
    assert_near(logits(half, image_files[:4], PROMPTS), logits(load(torch.float32), image_files[:4], PROMPTS), dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_blip2_trained_stage1_model_matches_in_half_precision(dtype, trained_tiny, shape_images):
    model = str(trained_tiny / "runs" / "tiny-stage1" / "latest")
    half = blip2cli.load(model, device="cpu", dtype=dtype)
    assert_follows(half, dtype, None)
    full = blip2cli.load(model, device="cpu", dtype="float32")
    texts = ["a red circle", "a blue square", "a green triangle"]
    torch.testing.assert_close(half.itc(shape_images, texts), full.itc(shape_images, texts), atol=0.02, rtol=0)
    torch.testing.assert_close(half.itm(shape_images[:3], texts), full.itm(shape_images[:3], texts), atol=0.02, rtol=0)


def test_cli_generates_in_bfloat16_from_a_blip2_run(trained_tiny, shape_images):
    """The command from the issue, as typed: a run directory's latest checkpoint in bfloat16."""
    images = [str(p) for p in shape_images]
    proc = blip2("generate", *images, "--model", "runs/tiny-stage2/latest", "--dtype", "bfloat16", "--device", "cpu",
                 "--json", "--num-beams", "3", "--max-new-tokens", "5", cwd=trained_tiny)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in records] == images
    expected = blip2cli.load(str(trained_tiny / "runs" / "tiny-stage2" / "latest"), device="cpu",
                             dtype="bfloat16").generate(images, num_beams=3, max_new_tokens=5)
    assert [r["text"] for r in records] == expected
