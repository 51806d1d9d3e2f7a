"""The decode engine (``models.search``) against its oracles on tiny random OPT and Flan-T5 BLIP-2 checkpoints:
transformers 5.x's ``generate`` token for token (``beam_scoring: transformers``), and transformers 4.33's beam
search as LAVIS ran it, written out below as a plain per-hypothesis search without a cache (``lavis``)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import blip2cli

from tests.tiny import NUM_QUERIES, hf_inputs

BATCHES = [["", "a photo of", "question: what is on the table? short answer:", "two dogs"],
           ["the man is riding", "", "a"]]


@pytest.fixture(scope="module", params=["opt", "t5"])
def pair(request, hf_opt, hf_t5):
    from transformers import Blip2ForConditionalGeneration

    path = hf_opt if request.param == "opt" else hf_t5
    ref = Blip2ForConditionalGeneration.from_pretrained(path).eval()
    return request.param, path, ref, blip2cli.load(str(path), device="cpu", dtype="float32")


@contextlib.contextmanager
def eos_bias(modules, eos: int, bias: float):
    """Add ``bias`` to the EOS logit of every LM head in ``modules`` (both sides), so that texts of random weights end
    at various steps, as real ones do."""
    def hook(module, args, output):
        output = output.clone()
        output[..., eos] += bias
        return output

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def heads(ref, blip):
    return [ref.language_model.get_output_embeddings(), blip.net.language_model.model.get_output_embeddings()]


def eos_of(blip) -> int:
    eos = blip.net.language_model.model.generation_config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def new_tokens(kind: str, ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """transformers' output without what blip2 does not echo: the prompt (OPT) or the decoder start (T5)."""
    return ids[:, prompt_length:] if kind == "opt" else ids[:, 1:]


def ours(blip, inputs, **kw) -> torch.Tensor:
    n = NUM_QUERIES
    return blip.net.generate(inputs["pixel_values"], inputs["input_ids"][:, n:], inputs["attention_mask"][:, n:],
                             pad_token_id=blip.checkpoint.tokenizer.pad_token_id, **kw)


CASES = {
    "greedy": dict(num_beams=1, max_new_tokens=9, min_new_tokens=2),
    "greedy-repetition": dict(num_beams=1, max_new_tokens=9, repetition_penalty=1.8),
    "beam5": dict(num_beams=5, max_new_tokens=9, min_new_tokens=1, length_penalty=1.0),
    "beam5-three-returned": dict(num_beams=5, num_return_sequences=3, max_new_tokens=7, length_penalty=1.0),
    "beam4-short-answers": dict(num_beams=4, max_new_tokens=6, length_penalty=-1.0, repetition_penalty=1.3),
    "beam3-early-stopping": dict(num_beams=3, max_new_tokens=8, min_new_tokens=3, early_stopping=True),
}


@pytest.mark.parametrize("late", [False, True], ids=["host-reads-now", "host-reads-late"])
@pytest.mark.parametrize("case", CASES)
def test_ids_equal_transformers_generate(pair, image_files, case, late, monkeypatch):
    """Token for token what transformers' ``generate`` returns, over batches of mixed prompt lengths whose texts
    end at different steps (the EOS logit raised on both sides); also when the loop learns a step late that an
    image has ended, as it does on a GPU so as never to wait for the device."""
    from blip2cli.models import search

    monkeypatch.setattr(search._LateReads, "late_on_cpu", late)
    kind, path, ref, blip = pair
    kw = CASES[case]
    lengths = set()
    for prompts in BATCHES:
        inputs = hf_inputs(path, blip, image_files[:len(prompts)], prompts)
        with eos_bias(heads(ref, blip), eos_of(blip), 2.5), torch.no_grad():
            expected = ref.generate(**inputs, do_sample=False, pad_token_id=blip.checkpoint.tokenizer.pad_token_id,
                                    **kw)
            got = ours(blip, inputs, **kw)
        expected = new_tokens(kind, expected, inputs["input_ids"].shape[1])
        assert torch.equal(got, expected), (case, prompts, got, expected)
        ended = (got == eos_of(blip)).any(dim=1)
        lengths |= {int(row.nonzero()[0]) if e else got.shape[1] for row, e in zip(got == eos_of(blip), ended)}
    assert len(lengths) > 1  # texts end at different steps


def test_beams_cost_one_prefill_per_image(pair, image_files):
    """The prompt runs once per image, not once per beam: the first LM call has one row per image."""
    _, path, _, blip = pair
    rows = []
    lm = blip.net.language_model.model
    inner = lm.get_decoder() if blip.net.language_model.is_encoder_decoder else lm
    handle = inner.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(next(v for v in (*args, *kwargs.values()) if torch.is_tensor(v)).shape[0]),
        with_kwargs=True)
    try:
        blip.generate(image_files[:3], ["a", "b c", ""], num_beams=5, max_new_tokens=4, batch_size=3)
    finally:
        handle.remove()
    assert rows[0] == 3 and rows[1] == 15


# --- beam_scoring: lavis ---------------------------------------------------------------------------------------


def _keep_best(hypotheses: list, k: int, score: float, tokens: list[int]) -> None:
    """transformers 4.33 ``BeamHypotheses.add``: keep the ``k`` best."""
    worst = min((h[0] for h in hypotheses), default=float("inf"))
    if len(hypotheses) < k or score > worst:
        hypotheses.append((score, tokens))
        if len(hypotheses) > k:
            hypotheses.remove(min(hypotheses, key=lambda h: h[0]))


def lavis_beam_search(next_log_probs, prefix: int, k: int, max_new: int, min_length: int, penalty: float,
                      eos: int) -> list[int]:
    """transformers 4.33's beam search for one image, as LAVIS ran it (early_stopping False): a finished hypothesis
    scores sum(log p) / (prefix + its tokens before EOS) ** penalty; a step is the last once ``k`` are finished and
    the worst of them beats the best candidate's sum / (prefix + t) ** penalty; at the length limit the running
    beams score sum / (prefix + max_new) ** penalty. ``min_length`` counts the prefix. No cache: each beam's
    next-token distribution comes from a full forward pass over its whole sequence."""
    running = [(0.0, [])] + [(-1e9, [])] * (k - 1)
    hypotheses: list = []
    for t in range(max_new):
        candidates = []
        for score, tokens in running:
            log_probs = next_log_probs(tokens)
            if prefix + t < min_length:
                log_probs[eos] = -float("inf")
            values, ids = (log_probs + score).topk(2 * k)
            candidates += [(float(v), tokens, int(i)) for v, i in zip(values, ids)]
        candidates = sorted(candidates, key=lambda c: -c[0])[:2 * k]
        running = []
        for rank, (value, tokens, token) in enumerate(candidates):
            if token == eos:
                if rank < k:
                    _keep_best(hypotheses, k, value / (prefix + t) ** penalty, tokens + [token])
            else:
                running.append((value, tokens + [token]))
            if len(running) == k:
                break
        if len(hypotheses) == k and min(h[0] for h in hypotheses) >= candidates[0][0] / (prefix + t) ** penalty:
            break
    else:
        for score, tokens in running:
            _keep_best(hypotheses, k, score / (prefix + max_new) ** penalty, tokens)
    return max(hypotheses, key=lambda h: h[0])[1]


def _reference_next(kind: str, blip, soft: torch.Tensor, prompt_ids: list[int]):
    """Next-token log-probabilities of one image's sequence, computed from scratch."""
    lm = blip.net.language_model.model
    embed = lm.get_input_embeddings()

    def next_log_probs(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            if kind == "opt":
                ids = torch.tensor([prompt_ids + tokens])
                logits = lm(inputs_embeds=torch.cat([soft, embed(ids)], dim=1)).logits[0, -1]
            else:
                start = lm.generation_config.decoder_start_token_id
                logits = lm(inputs_embeds=torch.cat([soft, embed(torch.tensor([prompt_ids]))], dim=1),
                            decoder_input_ids=torch.tensor([[start] + tokens])).logits[0, -1]
        return torch.log_softmax(logits.float(), dim=-1)

    return next_log_probs


@pytest.mark.parametrize("penalty", [1.0, -1.0])
def test_lavis_scoring_is_transformers_4_33_beam_search(pair, image_files, penalty):
    """``beam_scoring: lavis`` picks what transformers 4.33's scorer picks, on images where 5.x's scoring picks
    another text."""
    kind, path, ref, blip = pair
    tok = blip.checkpoint.tokenizer
    prompts = BATCHES[0] + BATCHES[1]
    images = (image_files * 2)[:len(prompts)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    pixels = blip.pixel_values(images)
    kw = dict(num_beams=3, max_new_tokens=7, min_new_tokens=2, length_penalty=penalty,
              pad_token_id=tok.pad_token_id)
    eos = eos_of(blip)
    with eos_bias(heads(ref, blip)[1:], eos, 4.5), torch.no_grad():
        lavis = blip.net.generate(pixels, enc.input_ids, enc.attention_mask, beam_scoring="lavis", **kw)
        transformers = blip.net.generate(pixels, enc.input_ids, enc.attention_mask, **kw)
        soft = blip.net.soft_prompts(pixels)
        expected = []
        for i, prompt in enumerate(prompts):
            prompt_ids = tok(prompt).input_ids
            prefix = len(prompt_ids) if kind == "opt" else 1
            expected.append(lavis_beam_search(_reference_next(kind, blip, soft[i:i + 1], prompt_ids), prefix, 3, 7,
                                              2, penalty, eos))

    def texts(rows):
        return [tok.decode(row, skip_special_tokens=True) for row in rows]

    assert texts(lavis) == texts(expected)
    assert texts(lavis) != texts(transformers)  # the scorings disagree somewhere: the test can tell them apart


def test_lavis_minimum_length_counts_the_prefix(pair, image_files):
    """Under ``lavis`` a minimum of 1 lets EOS come first (the prefix already counts), as LAVIS's ``min_length=1``;
    under ``transformers``, ``min_new_tokens=1`` forbids it."""
    kind, path, ref, blip = pair
    tok = blip.checkpoint.tokenizer
    enc = tok(["a photo of", "two dogs"], return_tensors="pt", padding=True)
    pixels = blip.pixel_values(image_files[:2])
    kw = dict(num_beams=1, max_new_tokens=4, min_new_tokens=1, pad_token_id=tok.pad_token_id)
    with eos_bias(heads(ref, blip)[1:], eos_of(blip), 50.0), torch.no_grad():
        lavis = blip.net.generate(pixels, enc.input_ids, enc.attention_mask, beam_scoring="lavis", **kw)
        transformers = blip.net.generate(pixels, enc.input_ids, enc.attention_mask, **kw)
    assert (lavis[:, 0] == eos_of(blip)).all()
    assert (transformers[:, 0] != eos_of(blip)).all() and (transformers[:, 1] == eos_of(blip)).all()


# --- sampling ----------------------------------------------------------------------------------------------------


def test_sampling_follows_the_seed_not_the_batch(pair, image_files):
    _, _, _, blip = pair
    kw = dict(sample=True, num_captions=3, max_new_tokens=6, seed=7, top_p=0.95)
    together = blip.generate(image_files[:4], "a photo of", batch_size=4, **kw)
    in_pairs = blip.generate(image_files[:4], "a photo of", batch_size=2, **kw)
    assert together == in_pairs
    assert blip.generate(image_files[:4], "a photo of", batch_size=4, **{**kw, "seed": 8}) != together
    assert len({text for texts in together for text in texts}) > 4  # draws differ across captions and images


MODES = {
    "greedy": dict(num_beams=1),
    "beams-transformers": dict(num_beams=5, length_penalty=1.0),
    "beams-lavis": dict(num_beams=5, length_penalty=-1.0, beam_scoring="lavis"),
    "sampling": dict(sample=True, seed=3, num_captions=2, top_p=0.9),
}


@pytest.mark.parametrize("mode", MODES)
def test_batched_output_equals_one_by_one(pair, image_files, mode):
    """A text does not depend on the batch it is decoded in, in every mode, with images leaving the batch early."""
    _, _, ref, blip = pair
    prompts = BATCHES[0]
    kw = dict(max_new_tokens=7, min_new_tokens=1, **MODES[mode])
    with eos_bias(heads(ref, blip)[1:], eos_of(blip), 2.5):
        together = blip.generate(image_files[:4], prompts, batch_size=4, **kw)
        alone = [blip.generate([image], [prompt], **kw)[0] for image, prompt in zip(image_files[:4], prompts)]
    assert together == alone
    assert len({str(t) for t in together}) > 1
