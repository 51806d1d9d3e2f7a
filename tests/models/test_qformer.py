"""The Q-Former's three attention patterns and its key/value cache."""

from __future__ import annotations

import pytest
import torch

from blip2cli.models.qformer import MaskMode, QFormer, QFormerConfig, self_attention_mask


def test_masks_follow_the_paper_table():
    text_mask = torch.tensor([[1, 1, 0]])  # two real tokens, one pad
    q = 2
    t, f = True, False
    expected = {
        "bidirectional": [[t, t, t, t, f]] * 5,
        "unimodal": [[t, t, f, f, f], [t, t, f, f, f], [f, f, t, t, f], [f, f, t, t, f], [f, f, t, t, f]],
        "causal": [[t, t, f, f, f], [t, t, f, f, f], [t, t, t, f, f], [t, t, t, t, f], [t, t, t, t, f]],
    }
    for mode, rows in expected.items():
        got = self_attention_mask(mode, q, text_mask)
        assert got.shape == (1, 1, 5, 5)
        assert got[0, 0].tolist() == rows, mode


def test_mask_with_cache_sees_all_past_keys():
    got = self_attention_mask(MaskMode.CAUSAL, 0, torch.ones(1, 2, dtype=torch.long), num_past=3)
    assert got[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]


@pytest.fixture
def qformer():
    torch.manual_seed(0)
    cfg = QFormerConfig(hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64, encoder_width=24,
                        num_query_tokens=3, vocab_size=50, max_position_embeddings=20)
    model = QFormer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_unimodal_pass_equals_separate_passes(qformer):
    image = torch.randn(2, 5, 24)
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    joint = qformer(image=image, input_ids=ids, text_mask=mask, mode="unimodal")
    queries = qformer(image=image).query_states
    text = qformer(input_ids=ids, text_mask=mask, use_queries=False).hidden_states
    torch.testing.assert_close(joint.query_states, queries, atol=1e-6, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(joint.text_states[real], text[real], atol=1e-6, rtol=0)


def test_bidirectional_lets_text_reach_queries(qformer):
    image = torch.randn(1, 5, 24)
    ids = torch.randint(1, 50, (1, 4))
    a = qformer(image=image, input_ids=ids, mode="bidirectional").query_states
    b = qformer(image=image, input_ids=ids.flip(1), mode="bidirectional").query_states
    c = qformer(image=image, input_ids=ids, mode="causal").query_states
    assert (a - b).abs().max() > 1e-4  # queries see the text
    torch.testing.assert_close(c, qformer(image=image).query_states, atol=1e-5, rtol=0)  # ITG: they do not


def test_cached_queries_and_incremental_decoding_equal_the_full_causal_pass(qformer):
    image = torch.randn(2, 5, 24)
    ids = torch.randint(1, 50, (2, 5))
    full = qformer(image=image, input_ids=ids, mode="causal").text_states
    cache = qformer(image=image, use_cache=True).cache
    text = qformer(input_ids=ids, past=cache, mode="causal", use_queries=False).text_states
    torch.testing.assert_close(text, full, atol=1e-5, rtol=0)
    past, steps = cache, []
    for i in range(ids.shape[1]):
        out = qformer(input_ids=ids[:, i:i + 1], past=past, mode="causal", use_queries=False, use_cache=True)
        past = out.cache
        steps.append(out.text_states)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    logits = qformer.text_logits(full)
    assert logits.shape == (2, 5, 50)


def test_lm_head_is_tied_to_word_embeddings(qformer):
    assert qformer.lm_head.decoder.weight is qformer.embeddings.word.weight


def test_stage2_qformer_refuses_text():
    q = QFormer(QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, encoder_width=8,
                              num_query_tokens=2, has_text=False, has_lm_head=False))
    with pytest.raises(ValueError, match="no text side"):
        q(image=torch.randn(1, 3, 8), input_ids=torch.ones(1, 2, dtype=torch.long))
