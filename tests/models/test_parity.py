"""blip2 against transformers' BLIP-2 on the same (tiny, random) weights: logits, search, ITM, ITC."""

from __future__ import annotations

import pytest
import torch

import blip2cli
from blip2cli.models.formats import hf, native

from tests.tiny import NUM_QUERIES, PROMPTS, TEXTS, hf_inputs


def hf_generate(ref, inputs, is_decoder_only, **kw):
    out = ref.generate(**inputs, **kw)
    return out[:, inputs["input_ids"].shape[1]:] if is_decoder_only else out


@pytest.fixture(params=["opt", "t5"])
def pair(request, hf_opt, hf_t5):
    from transformers import Blip2ForConditionalGeneration

    path = hf_opt if request.param == "opt" else hf_t5
    ref = Blip2ForConditionalGeneration.from_pretrained(path).eval()
    return request.param, path, ref, blip2cli.load(str(path), device="cpu", dtype="float32")


def test_logits_match_transformers(pair, image_files):
    kind, path, ref, blip = pair
    inputs = hf_inputs(path, blip, image_files[:4], PROMPTS)
    n = NUM_QUERIES
    extra = {}
    if kind == "t5":
        extra["decoder_input_ids"] = torch.tensor([[0, 5, 6, 7]] * 4)
    with torch.no_grad():
        expected = ref(**inputs, **extra).logits
        ours = blip.net(inputs["pixel_values"], inputs["input_ids"][:, n:], inputs["attention_mask"][:, n:],
                        **extra).logits
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert expected.abs().max() > 1e-2  # a real signal, not zeros


@pytest.mark.parametrize("num_beams", [1, 5])
def test_search_matches_transformers(pair, image_files, num_beams):
    kind, path, ref, blip = pair
    images = image_files[:4]
    inputs = hf_inputs(path, blip, images, PROMPTS)
    kw = dict(num_beams=num_beams, max_new_tokens=8, min_new_tokens=2, length_penalty=1.0, do_sample=False,
              pad_token_id=blip.checkpoint.tokenizer.pad_token_id)
    expected_ids = hf_generate(ref, inputs, kind == "opt", **kw)
    expected = [t.strip() for t in blip.checkpoint.tokenizer.batch_decode(expected_ids, skip_special_tokens=True)]
    ours = blip.generate(images, PROMPTS, num_beams=num_beams, max_new_tokens=8, min_new_tokens=2, batch_size=4)
    assert ours == expected
    assert len(set(ours)) > 1  # different images and prompts give different texts


def test_batched_generation_equals_one_by_one(pair, image_files):
    _, _, _, blip = pair
    images = image_files[:4]
    together = blip.generate(images, PROMPTS, num_beams=5, max_new_tokens=6, batch_size=4)
    alone = [blip.generate([im], [p], num_beams=5, max_new_tokens=6)[0] for im, p in zip(images, PROMPTS)]
    assert together == alone


def test_num_captions_returns_lists(pair, image_files):
    _, _, _, blip = pair
    out = blip.generate(image_files[:2], "a photo of", num_beams=3, num_captions=3, max_new_tokens=4)
    assert len(out) == 2 and all(len(texts) == 3 for texts in out)


@pytest.fixture
def itm_pair(hf_itm):
    from transformers import Blip2ForImageTextRetrieval

    ref = Blip2ForImageTextRetrieval.from_pretrained(hf_itm).eval()
    return ref, blip2cli.load(str(hf_itm), device="cpu", dtype="float32")



def test_itm_matches_transformers(itm_pair, image_files):
    ref, blip = itm_pair
    tok = blip.checkpoint.qformer_tokenizer
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    pixels = blip.pixel_values(image_files[:4])
    with torch.no_grad():
        logits = ref(pixel_values=pixels, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                     use_image_text_matching_head=True).logits_per_image
    expected = logits.softmax(dim=1)[:, 1]
    ours = blip.itm(image_files[:4], TEXTS)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert expected.std() > 1e-4


def test_itc_matches_transformers(itm_pair, image_files):
    ref, blip = itm_pair
    tok = blip.checkpoint.qformer_tokenizer
    enc = tok(TEXTS[:3], return_tensors="pt", padding=True)
    pixels = blip.pixel_values(image_files[:4])
    with torch.no_grad():
        expected = ref(pixel_values=pixels, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                       use_image_text_matching_head=False).logits_per_image
    ours = blip.itc(image_files[:4], TEXTS[:3])
    assert ours.shape == (4, 3)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_extract_features_agree_with_itc(itm_pair, image_files):
    _, blip = itm_pair
    img = blip.extract_features(image_files[:2], mode="image")
    txt = blip.extract_features(texts=TEXTS[:3], mode="text")
    sims = torch.einsum("iqd,td->iqt", img["image_features"], txt["text_features"]).max(1).values
    torch.testing.assert_close(sims, blip.itc(image_files[:2], TEXTS[:3]), atol=1e-6, rtol=0)
    mm = blip.extract_features(image_files[:2], TEXTS[:2], mode="multimodal")
    assert mm["multimodal_embeds"].shape == (2, NUM_QUERIES, 32)


def test_export_reloads_in_transformers(pair, image_files, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    kind, path, ref, blip = pair
    out = hf.export_hf(blip.checkpoint, tmp_path / "exported")
    again = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    inputs = hf_inputs(path, blip, image_files[:2], PROMPTS[:2])
    extra = {"decoder_input_ids": torch.tensor([[0, 5, 6]] * 2)} if kind == "t5" else {}
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs, **extra).logits, ref(**inputs, **extra).logits, atol=1e-6, rtol=0)
    kw = dict(num_beams=5, max_new_tokens=6, pad_token_id=blip.checkpoint.tokenizer.pad_token_id)
    assert torch.equal(again.generate(**inputs, **kw), ref.generate(**inputs, **kw))


def test_export_itm_reloads_in_transformers(itm_pair, image_files, tmp_path):
    from transformers import Blip2ForImageTextRetrieval

    ref, blip = itm_pair
    again = Blip2ForImageTextRetrieval.from_pretrained(hf.export_hf(blip.checkpoint, tmp_path / "x")).eval()
    enc = blip.checkpoint.qformer_tokenizer(TEXTS, return_tensors="pt", padding=True)
    args = dict(pixel_values=blip.pixel_values(image_files[:4]), input_ids=enc.input_ids,
                attention_mask=enc.attention_mask)
    with torch.no_grad():
        for itm in (True, False):
            torch.testing.assert_close(again(**args, use_image_text_matching_head=itm).logits_per_image,
                                       ref(**args, use_image_text_matching_head=itm).logits_per_image,
                                       atol=1e-6, rtol=0)


def test_own_format_round_trip(pair, image_files, tmp_path):
    _, _, _, blip = pair
    out = native.save(blip.checkpoint, tmp_path / "ours")
    again = blip2cli.load(str(out), device="cpu", dtype="float32")
    kw = dict(num_beams=5, max_new_tokens=6)
    assert again.generate(image_files[:3], "a photo of", **kw) == blip.generate(image_files[:3], "a photo of", **kw)
    assert not list(tmp_path.glob(".ours.*"))  # the temporary directory was renamed away
