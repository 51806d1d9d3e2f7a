"""Tiny stage-1 and stage-2 tasks and their batches, shared by the loss tests, the two-rank (gloo) tests and the
DeepSpeed worker (``tests/ds_worker.py``), which must build the very same tasks in other processes."""

from __future__ import annotations

import torch

from blip2cli.config import load_recipe
from blip2cli.models.blip2 import Blip2Config, Blip2Stage1
from blip2cli.models.qformer import QFormerConfig
from blip2cli.models.vision import VisionConfig
from blip2cli.train.recipe import PretrainRecipe
from blip2cli.train.tasks import Stage1Loss, Stage1Task, Stage2Loss, Stage2Task

from tests import tiny

B = 3  # the batch of each rank; one process takes the ranks' batches together


def tiny_stage1(tok=None) -> tuple[Blip2Stage1, object]:
    """A tiny stage-1 network (EVA-style tower, 2-layer Q-Former) and its tokenizer, with seeded weights."""
    tok = tok if tok is not None else tiny.bert_tokenizer()
    cfg = Blip2Config(vision=VisionConfig(kind="eva", image_size=32, patch_size=8, width=32, layers=2, heads=4,
                                          mlp_dim=64),
                      qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                            encoder_width=32, num_query_tokens=4, vocab_size=len(tok),
                                            max_position_embeddings=64),
                      embed_dim=16)
    torch.manual_seed(0)
    return Blip2Stage1(cfg), tok


def tiny_batch(n: int) -> dict:
    """``n`` drawn images (transformed) and their captions."""
    from blip2cli.models.vision import image_transform

    t = image_transform(32)
    return {"image": torch.stack([t(tiny.draw_image(i)) for i in range(n)]),
            "text": [tiny.CORPUS[i % 7] for i in range(n)]}


def stage1_task(tokenizer_dir: str):
    from transformers import AutoTokenizer

    # a tokenizer trained once and saved: training is not deterministic across processes
    net, tok = tiny_stage1(AutoTokenizer.from_pretrained(tokenizer_dir))
    net.vision.requires_grad_(False)
    return Stage1Task(net, tok, Stage1Loss(max_txt_len=16)).eval()  # eval: no dropout, comparable runs


def stage2_task(hf_dir):
    from blip2cli.models.formats.hf import load_hf_dir

    ckpt = load_hf_dir(hf_dir)
    for m in ckpt.net.frozen_modules():
        m.requires_grad_(False)
    return Stage2Task(ckpt.net, ckpt.tokenizer, Stage2Loss()).eval()


def question_aware(net, vocab_size: int, max_positions: int):
    """A copy of the image-to-text network ``net`` (sharing its LLM) whose Q-Former reads the question: its weights,
    plus a random text side (word and position embeddings, text FFNs), which is all it lacked."""
    from dataclasses import replace

    from blip2cli.models.blip2 import Blip2ImageToText

    cfg = net.config
    qcfg = replace(cfg.qformer, has_text=True, has_lm_head=False, vocab_size=vocab_size,
                   max_position_embeddings=max_positions)
    aware = Blip2ImageToText(replace(cfg, qformer=qcfg, qformer_text_input=True),
                             language_model=net.language_model.model)
    missing, unexpected = aware.load_state_dict(net.state_dict(), strict=False)
    assert not unexpected and all(".embeddings." in k or ".text_ffn." in k for k in missing)
    return aware


def vqa_task(hf_dir, tokenizer_dir: str):
    """A VQA fine-tune of the tiny OPT model: its Q-Former given a (seeded, random) text side that reads the
    question, the ViT trained, the LLM frozen."""
    from transformers import AutoTokenizer

    from blip2cli.models.formats.hf import load_hf_dir
    from blip2cli.train.vqa import VqaTask

    ckpt = load_hf_dir(hf_dir)
    qtok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    net = question_aware(ckpt.net, len(qtok), max_positions=64)
    net.language_model.requires_grad_(False)
    return VqaTask(net, ckpt.tokenizer, qtok, Stage2Loss(prompt="Question: {} Answer:")).eval()


def tiny_vqa_batch(n: int) -> dict:
    """``n`` drawn images, a question on each, and one to three weighted answers."""
    batch = tiny_batch(n)
    words = [tiny.CORPUS[i % 7].split() for i in range(n)]
    return {"image": batch["image"], "question": [f"what is {w[0]} ?" for w in words],
            "answers": [w[1:1 + 1 + i % 3] for i, w in enumerate(words)],
            "weights": [[1.0 / (1 + i % 3)] * (1 + i % 3) for i in range(n)]}


def _grads(task) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


def forward_backward(task, batch, step=5):
    """One step's losses and the gradients they leave."""
    out = task(batch, step=step)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, _grads(task)


def recipe_for(zero: int) -> PretrainRecipe:
    """The tiny stage-1 recipe under ZeRO stage ``zero``, batch B per rank, fp32."""
    return load_recipe(PretrainRecipe, "tiny/stage1", [f"train.zero_stage={zero}", f"data.batch_size={B}",
                                                       "train.precision=fp32"])


def task_for(stage: str, assets: str):
    """The tasks above, from files made once (tokenizer training is not repeatable)."""
    if stage == "vqa":
        return vqa_task(f"{assets}/opt", f"{assets}/bert")
    return stage1_task(f"{assets}/bert") if stage == "stage1" else stage2_task(f"{assets}/opt")


def batch_for(stage: str, n: int) -> dict:
    return tiny_vqa_batch(n) if stage == "vqa" else tiny_batch(n)


def rank_part(batch: dict, rank: int) -> dict:
    """Rank ``rank``'s B items of a batch made for every rank."""
    return {k: v[rank * B:(rank + 1) * B] for k, v in batch.items()}
