"""``blip2 convert --to hf`` on a model blip2 trained itself: its LLM's vocabulary has no free row for the
``<image>`` token transformers needs, so export grows the embeddings (and LM head) by one; transformers'
``Blip2ForConditionalGeneration`` then loads the directory and writes what blip2 writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import blip2cli

from tests.helpers import blip2

PROMPTS = ["", "a photo of", "what colour is it?", "the"]


@pytest.fixture(scope="module")
def exported(trained_tiny, tmp_path_factory) -> tuple[Path, Path]:
    """(the run's latest checkpoint, its export), converted through the CLI as users type it."""
    root = trained_tiny
    out = tmp_path_factory.mktemp("export") / "hf"
    proc = blip2("convert", "runs/tiny-stage2/latest", "--out", str(out), "--to", "hf", cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ln_vision uses 1e-05" in proc.stderr  # the tiny recipe's (LAVIS's) eps, which transformers lacks
    return root / "runs" / "tiny-stage2" / "latest", out


def load_as_exported(latest: Path):
    """blip2 on the run's checkpoint, with ``ln_vision``'s eps set to the one transformers applies (the tower's):
    the one thing a transformers config cannot hold (README, "Where blip2 deliberately differs")."""
    blip = blip2cli.load(str(latest), device="cpu", dtype="float32")
    blip.net.ln_vision.eps = blip.config.vision.layer_norm_eps
    return blip


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    from blip2cli.data.synthetic import ShapesDataset

    return ShapesDataset("heldout", size=4, image_size=64, seed=1).write_images(tmp_path_factory.mktemp("shapes"), 4)


def hf_inputs(path: Path, blip, images, prompts) -> dict[str, torch.Tensor]:
    """What Blip2Processor builds from the exported directory: ``<image>`` x queries, then the left-padded prompt."""
    from transformers import AutoTokenizer, Blip2Config

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    config = Blip2Config.from_pretrained(path)
    enc = tok(prompts, return_tensors="pt", padding=True)
    n, queries = len(prompts), config.num_query_tokens
    image_ids = torch.full((n, queries), config.image_token_id)
    return dict(pixel_values=blip.pixel_values(images), input_ids=torch.cat([image_ids, enc.input_ids], 1),
                attention_mask=torch.cat([torch.ones(n, queries, dtype=torch.long), enc.attention_mask], 1))


def test_export_adds_an_image_token_row(exported):
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration

    latest, out = exported
    ours = blip2cli.load(str(latest), device="cpu", dtype="float32")
    vocab = ours.config.text["vocab_size"]
    assert vocab == len(ours.checkpoint.tokenizer)  # no free row: the case that used to be refused
    ref = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert ref.config.image_token_id == tok.convert_tokens_to_ids("<image>") == vocab
    lm = ref.language_model
    assert lm.get_input_embeddings().weight.shape[0] == lm.get_output_embeddings().weight.shape[0] == vocab + 1
    ours_lm = ours.net.language_model.model
    torch.testing.assert_close(lm.get_output_embeddings().weight[:vocab], ours_lm.get_output_embeddings().weight)
    torch.testing.assert_close(lm.get_input_embeddings().weight[:vocab], ours_lm.get_input_embeddings().weight)


def test_exported_logits_are_blip2s(exported, images):
    """The original vocabulary's logits are blip2's; the new row scores the mean of the others (never the best)."""
    from transformers import Blip2ForConditionalGeneration

    latest, out = exported
    ours = load_as_exported(latest)
    ref = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    inputs = hf_inputs(out, ours, images, PROMPTS)
    queries = ref.config.num_query_tokens
    with torch.no_grad():
        theirs = ref(**inputs).logits
        mine = ours.net(inputs["pixel_values"], inputs["input_ids"][:, queries:],
                        inputs["attention_mask"][:, queries:]).logits
    vocab = mine.shape[-1]
    assert theirs.shape[-1] == vocab + 1
    torch.testing.assert_close(theirs[..., :vocab], mine, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs[..., vocab], mine.mean(dim=-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_transformers_writes_what_blip2_writes(exported, images, num_beams):
    from transformers import Blip2ForConditionalGeneration

    latest, out = exported
    ours = load_as_exported(latest)
    ref = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    inputs = hf_inputs(out, ours, images, PROMPTS)
    kw = dict(num_beams=num_beams, max_new_tokens=6, min_new_tokens=2)
    ids = ref.generate(**inputs, **kw, do_sample=False, pad_token_id=ref.config.text_config.pad_token_id)
    ids = ids[:, inputs["input_ids"].shape[1]:]  # decoder-only: transformers echoes the prompt
    theirs = [t.strip() for t in ours.checkpoint.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    mine = ours.generate(images, PROMPTS, batch_size=4, **kw)
    assert theirs == mine
    assert len(set(mine)) > 1
    again = blip2cli.load(str(out), device="cpu", dtype="float32")  # and blip2 reads its export back
    assert again.generate(images, PROMPTS, batch_size=4, **kw) == mine
