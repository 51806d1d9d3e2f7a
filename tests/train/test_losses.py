"""Training objectives against direct computations, and the stage tasks on tiny networks."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from blip2cli.models.blip2 import Blip2ImageToText
from blip2cli.train import losses
from blip2cli.train.tasks import Stage1Loss, Stage1Task, Stage2Loss, Stage2Task

from tests import tiny
from tests.train.tiny_tasks import tiny_batch, tiny_stage1


def test_itc_is_max_over_queries_with_label_smoothing():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(3, 4, 8), dim=-1)
    txt = F.normalize(torch.randn(3, 8), dim=-1)
    temp = torch.tensor(0.07)
    loss, i2t, t2i = losses.itc_loss(img, txt, temp, label_smoothing=0.1)
    sim = torch.zeros(3, 3)
    for i in range(3):
        for t in range(3):
            sim[i, t] = max(float(img[i, q] @ txt[t]) for q in range(4)) / 0.07

    def smoothed_ce(logits):
        total = 0.0
        for r in range(3):
            logp = logits[r].log_softmax(0)
            total += -(0.9 * logp[r] + 0.1 * logp.mean())
        return total / 3

    torch.testing.assert_close(i2t, sim)
    torch.testing.assert_close(t2i, sim.T)
    torch.testing.assert_close(loss, (smoothed_ce(sim) + smoothed_ce(sim.T)) / 2)


def test_hard_negatives_never_pick_a_positive_and_follow_softmax():
    sim = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    positives = losses.positive_mask(1, torch.tensor([7]))  # ids: only column 0 is the same image here
    assert positives.tolist() == [[True]]
    positives = torch.tensor([[True, False, False, False]])
    picks = [int(losses.sample_hard_negatives(sim, positives, [s])[0]) for s in range(3000)]
    assert 0 not in picks
    freq = torch.bincount(torch.tensor(picks), minlength=4).float() / len(picks)
    expected = torch.tensor([0.0, 1.0, math.e, math.e ** -1])
    expected /= expected.sum()
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)
    again = [int(losses.sample_hard_negatives(sim, positives, [s])[0]) for s in range(50)]
    assert again == picks[:50]  # a row's draw depends on its seed only


def test_same_image_pairs_are_positives():
    ids = torch.tensor([1, 2, 1])
    assert losses.positive_mask(3, ids).tolist() == [[True, False, True], [False, True, False],
                                                      [True, False, True]]


def test_token_loss_is_the_token_mean_in_one_process():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, -100, -100, -100], [3, 4, 5, 6, -100]])
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(losses.token_loss(logits, labels), expected)


def test_prefix_split_covers_the_caption():
    rng = random.Random(0)
    text = "a man riding a horse on the beach at sunset"
    seen = set()
    for _ in range(200):
        prefix, suffix = losses.prefix_split(text, rng)
        assert f"{prefix} {suffix}" == text
        k = len(prefix.split())
        assert 1 <= k <= len(text.split()) // 2
        seen.add(k)
    assert seen == set(range(1, 6))
    assert losses.prefix_split("cat", rng) == ("", "cat")


def test_stage1_task_sums_three_losses_and_trains_only_the_bridge():
    net, tok = tiny_stage1()
    for p in net.vision.parameters():
        p.requires_grad_(False)
    task = Stage1Task(net, tok, Stage1Loss(max_txt_len=16))
    out = task(tiny_batch(4), step=3)
    torch.testing.assert_close(out["loss"].detach(), out["itc"] + out["itm"] + out["itg"])
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert all(p.grad is None for p in net.vision.parameters())
    for name in ("qformer.query_tokens", "temp", "ln_vision.weight", "vision_proj.weight", "itm_head.weight",
                 "qformer.lm_head.dense.weight", "qformer.layers.0.cross_attn.key.weight",
                 "qformer.layers.1.text_ffn.fc1.weight"):
        assert net.get_parameter(name).grad.abs().sum() > 0, name
    task.eval()  # no dropout: the same step draws the same negatives, a later step others
    first, again, later = task(tiny_batch(4), step=3), task(tiny_batch(4), step=3), task(tiny_batch(4), step=4)
    torch.testing.assert_close(again["itm"], first["itm"])
    assert not torch.equal(later["itm"], first["itm"])


def test_stage2_decoder_only_labels_mask_prompt_and_padding():
    tok = tiny.opt_tokenizer()
    task = Stage2Task.__new__(Stage2Task)
    torch.nn.Module.__init__(task)
    task.tokenizer, task.settings = tok, Stage2Loss(prompt="a photo of ")
    ids, mask, labels = task.decoder_only_inputs(["a red circle", "two dogs are playing in the park"], "cpu")
    prompt_len = len(tok("a photo of").input_ids)
    assert ids[0, 0] == 2  # BOS
    assert (labels[:, :prompt_len] == -100).all()
    assert (labels[mask == 0] == -100).all()
    newline = tok.convert_tokens_to_ids("Ċ")
    last = mask.sum(1) - 1
    assert labels[torch.arange(2), last].tolist() == [newline, newline]  # "\n" ends each caption
    assert tok.decode(labels[1][labels[1] != -100]).strip() == "two dogs are playing in the park"


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_task_backpropagates_into_the_bridge_only(kind, hf_opt, hf_t5):
    from blip2cli.models.formats.hf import load_hf_dir

    ckpt = load_hf_dir(hf_opt if kind == "opt" else hf_t5)
    net: Blip2ImageToText = ckpt.net
    for module in net.frozen_modules():
        module.requires_grad_(False)
    task = Stage2Task(net, ckpt.tokenizer, Stage2Loss())
    out = task(tiny_batch(3), step=0)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in net.language_model.parameters())
    assert net.language_projection.weight.grad.abs().sum() > 0
    assert net.qformer.query_tokens.grad.abs().sum() > 0
