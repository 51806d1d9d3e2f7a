"""A question-aware (VQA fine-tuned) model exported to transformers' InstructBLIP layout: transformers loads it
and agrees with us, and our loader reads it back unchanged."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from blip2cli.api import Blip2
from blip2cli.models.assemble import Checkpoint, build, full_state
from blip2cli.models.formats import hf
from blip2cli.models.qformer import QFormer
from blip2cli.models.qformer_text import qformer_text

from tests.tiny import NUM_QUERIES, bert_tokenizer

# different lengths, so that the shorter question (and, for OPT, its prompt) is padded
QUESTIONS = ["what is on the table?", "what colour is the sky in the park where two dogs are playing?"]


def question_aware(base: Checkpoint, seed: int) -> Checkpoint:
    """``base`` (a tiny question-blind BLIP-2) with a Q-Former that reads the question: its text side (BERT
    embeddings and text FFNs, random) added, and a BERT tokenizer for the question."""
    qtok = bert_tokenizer()
    qcfg = replace(base.config.qformer, has_text=True, has_lm_head=False, vocab_size=len(qtok))
    cfg = replace(base.config, qformer=qcfg, qformer_text_input=True)
    g = torch.Generator().manual_seed(seed)
    text_side = {}
    for name, p in QFormer(qcfg).state_dict().items():
        if name.startswith("embeddings.") or ".text_ffn." in name:
            noise = torch.randn(p.shape, generator=g)
            text_side[f"qformer.{name}"] = 1 + 0.1 * noise if ".norm.weight" in name else 0.2 * noise
    state = {k: v for k, v in full_state(base.net).items() if not k.startswith("language_model.")}
    net = build(cfg, state | text_side, base.net.language_model.model.state_dict(), "tiny question-aware")
    return Checkpoint(net, cfg, base.tokenizer, qtok, base.generation, "tiny question-aware")


@pytest.fixture(scope="module", params=["opt", "t5"])
def model(request, hf_opt, hf_t5):
    base = hf.load_hf_dir(hf_opt if request.param == "opt" else hf_t5, torch.float32)
    return request.param, Blip2(question_aware(base, seed=7), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    _, blip = model
    return hf.export_hf(blip.checkpoint, tmp_path_factory.mktemp("instructblip") / "exported")


def _inputs(kind: str, blip: Blip2, images) -> dict[str, torch.Tensor]:
    """Our inputs for both models: pixels, the LLM's prompt (the question) and the Q-Former's question."""
    ckpt = blip.checkpoint
    prompt = ckpt.tokenizer(QUESTIONS, return_tensors="pt", padding=True)
    qids, qmask = qformer_text(ckpt.qformer_tokenizer, QUESTIONS, blip.config.qformer.max_txt_len)
    assert not bool(qmask.all())  # the shorter question is padded
    out = dict(pixel_values=blip.pixel_values(images), input_ids=prompt.input_ids,
               attention_mask=prompt.attention_mask, question_ids=qids, question_mask=qmask)
    if kind == "t5":
        out["decoder_input_ids"] = torch.tensor([[0, 5, 6, 7]] * 2)
    return out


def _ours(blip: Blip2, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return blip.net(**inputs).logits


def _theirs(ref, image_token_id: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' logits: its prompt starts with one ``<image>`` per query, where the soft prompts go."""
    n = len(QUESTIONS)
    image_ids = torch.full((n, NUM_QUERIES), image_token_id)
    extra = {"decoder_input_ids": inputs["decoder_input_ids"]} if "decoder_input_ids" in inputs else {}
    with torch.no_grad():
        return ref(pixel_values=inputs["pixel_values"], qformer_input_ids=inputs["question_ids"],
                   qformer_attention_mask=inputs["question_mask"],
                   input_ids=torch.cat([image_ids, inputs["input_ids"]], 1),
                   attention_mask=torch.cat([torch.ones(n, NUM_QUERIES, dtype=torch.long),
                                             inputs["attention_mask"]], 1), **extra).logits


def test_transformers_loads_the_export_and_agrees(model, exported, image_files):
    from transformers import InstructBlipForConditionalGeneration

    kind, blip = model
    ref, info = InstructBlipForConditionalGeneration.from_pretrained(exported, dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not any(info.values()), info  # every weight read, none left over
    ref.eval()
    assert ref.config.model_type == "instructblip"
    assert ref.config.image_token_id == blip.config.image_token_id is not None
    inputs = _inputs(kind, blip, image_files[:2])
    ours = _ours(blip, inputs)
    expected = _theirs(ref, blip.config.image_token_id, inputs)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 1e-2  # a real signal, not zeros
    other = dict(inputs, question_ids=inputs["question_ids"].flip(0), question_mask=inputs["question_mask"].flip(0))
    assert not torch.allclose(_ours(blip, other), _ours(blip, inputs))  # the question matters


def test_processor_tokenizes_as_we_do(model, exported, image_files):
    from transformers import InstructBlipProcessor

    kind, blip = model
    processor = InstructBlipProcessor.from_pretrained(exported)
    # the saved LLM tokenizer does not record our padding side (left for decoder-only LLMs)
    processor.tokenizer.padding_side = blip.checkpoint.tokenizer.padding_side
    enc = processor(images=[blip.read_image(p) for p in image_files[:2]], text=QUESTIONS, return_tensors="pt",
                    padding=True)
    inputs = _inputs(kind, blip, image_files[:2])
    assert torch.equal(enc["qformer_input_ids"], inputs["question_ids"])
    assert torch.equal(enc["qformer_attention_mask"], inputs["question_mask"])
    image_ids = torch.full((2, NUM_QUERIES), blip.config.image_token_id)
    assert torch.equal(enc["input_ids"], torch.cat([image_ids, inputs["input_ids"]], 1))
    # the same image transform, up to one 8-bit level of rounding (1/255/std, about 0.015)
    torch.testing.assert_close(enc["pixel_values"], inputs["pixel_values"], atol=0.02, rtol=0)


def test_round_trip_is_identical(model, exported, image_files):
    kind, blip = model
    again = hf.load_hf_dir(exported, torch.float32)
    assert again.config.qformer_text_input and again.config.qformer.has_text and not again.config.qformer.has_lm_head
    assert again.config.image_token_id == blip.config.image_token_id
    before, after = full_state(blip.net), full_state(again.net)
    assert sorted(before) == sorted(after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert again.qformer_tokenizer(QUESTIONS).input_ids == blip.checkpoint.qformer_tokenizer(QUESTIONS).input_ids
    inputs = _inputs(kind, blip, image_files[:2])
    assert torch.equal(_ours(Blip2(again, torch.device("cpu"), torch.float32), inputs), _ours(blip, inputs))
