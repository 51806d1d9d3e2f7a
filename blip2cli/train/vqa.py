"""VQA fine-tuning: the question read by the Q-Former (its tokens join the queries' self-attention) and by the
LLM ("Question: {} Answer:"), each distinct answer a target weighted by its share of the annotators' answers."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from ..models.assemble import Checkpoint
from ..models.blip2 import Blip2Config, Blip2ImageToText, Blip2Stage1
from ..models.qformer_text import qformer_text
from ..runtime.devices import dtype_of
from ..runtime.errors import Blip2Error
from .build import fine_tune_start, freeze
from .recipe import PretrainRecipe
from .tasks import Stage2Loss, Stage2Task


class VqaTask(Stage2Task):
    """Answer generation through a frozen LLM, with BLIP's VQA loss: each (question, distinct answer) pair is a
    sequence whose summed token loss is weighted by that answer's share; the batch loss is the weighted sum over
    the batch's questions, divided by their number.

    ``qformer_tokenizer`` is None for a question-blind Q-Former (the question then reaches the LLM only).
    """

    def __init__(self, net: Blip2ImageToText, tokenizer: Any, qformer_tokenizer: Any, settings: Stage2Loss) -> None:
        if "{}" not in settings.prompt:
            raise ValueError(f"a VQA prompt marks the question with {{}}: {settings.prompt!r}")
        if (qformer_tokenizer is not None) != net.config.qformer_text_input:
            raise ValueError("a Q-Former tokenizer goes with a Q-Former that reads the question, and only with one")
        super().__init__(net, tokenizer, settings)
        self.qformer_tokenizer = qformer_tokenizer

    def soft_prompts(self, pixels: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """One visual prompt per question (the Q-Former reads the question when it can)."""
        if self.qformer_tokenizer is None:
            return self.net.soft_prompts(pixels)
        ids, mask = qformer_text(self.qformer_tokenizer, questions, self.net.config.qformer.max_txt_len,
                                 pixels.device)
        return self.net.soft_prompts(pixels, ids, mask)

    def forward(self, batch: dict[str, Any], step: int = 0) -> dict[str, torch.Tensor]:
        pixels = batch["image"]
        questions = batch["question"]
        rows = [(i, answer, weight) for i, (answers, weights) in enumerate(zip(batch["answers"], batch["weights"]))
                for answer, weight in zip(answers, weights)]
        device = pixels.device
        index = torch.tensor([i for i, _, _ in rows], device=device)
        weights = torch.tensor([w for _, _, w in rows], device=device, dtype=torch.float32)
        soft = self.soft_prompts(pixels, questions)[index]
        prompts = [self.settings.prompt.format(questions[i]) for i, _, _ in rows]
        answers = [answer for _, answer, _ in rows]
        lm = self.net.language_model
        if lm.is_encoder_decoder:
            self.tokenizer.padding_side = "right"
            enc_ids, enc_mask = self._encode(prompts, device)
            dec_ids, dec_mask = self._encode(answers, device)
            labels = dec_ids.masked_fill(dec_mask == 0, -100)
            logits = lm(soft, enc_ids, enc_mask, labels=labels, decoder_attention_mask=dec_mask).logits
            tokens = enc_mask.sum() + dec_mask.sum()
        else:
            ids, mask, labels = self.prompt_then_answer(prompts, answers, device)
            logits = lm(soft, ids, mask).logits[:, soft.shape[1]:-1]
            labels = labels[:, 1:]
            tokens = mask.sum()
        per_answer = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                     reduction="none").sum(dim=1)
        loss = (weights * per_answer).sum() / len(questions)
        return {"loss": loss, "vqa": loss.detach(), "tokens": tokens}

    def prompt_then_answer(self, prompts: list[str], answers: list[str],
                           device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder-only inputs: ``[BOS] prompt`` then `` answer\\n``, tokenised apart (so no merge across the seam
        moves a token between them) and right-padded; labels only on the answer and its newline (the end of a
        text for BLIP-2's OPT, as in stage 2)."""
        head = self.tokenizer(prompts, add_special_tokens=True, truncation=self.settings.max_txt_len is not None,
                              max_length=self.settings.max_txt_len).input_ids
        tail = self.tokenizer([" " + a + "\n" for a in answers], add_special_tokens=False).input_ids
        width = max(len(h) + len(t) for h, t in zip(head, tail))
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        labels = torch.full((len(prompts), width), -100, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, (h, t) in enumerate(zip(head, tail)):
            ids[r, :len(h) + len(t)] = torch.tensor(h + t)
            labels[r, len(h):len(h) + len(t)] = torch.tensor(t)
            mask[r, :len(h) + len(t)] = 1
        return ids.to(device), mask.to(device), labels.to(device)


def build_vqa(recipe: PretrainRecipe, init: str, llm: str | None = None) -> tuple[VqaTask, Checkpoint]:
    """A VQA fine-tune of a stage-2 model: as a caption fine-tune (LLM frozen, ViT, Q-Former and projection trained),
    with a Q-Former that reads the question (``model.question_in_qformer``, on unless false). A model without a
    Q-Former text side (every stage-2 model) takes it, with its BERT tokenizer, from the stage-1 model
    ``model.qformer_text_init``."""
    if not init:
        raise Blip2Error("a VQA fine-tune starts from a stage-2 model: pass --init (blip2-opt-2.7b, a LAVIS stage-2 "
                         ".pth with --llm, or runs/<stage2 run>/latest)")
    m = recipe.model
    question_side = QuestionSide(m.question_in_qformer is not False, m.qformer_text_init, init)
    net, start, sources = fine_tune_start(
        recipe, init, Blip2ImageToText, "not a stage-2 (image-to-text) model; a VQA fine-tune starts from one",
        llm=llm, adapt=question_side.adapt)
    freeze([net.language_model], dtype_of(m.frozen_dtype))
    qtok = question_side.tokenizer  # None for a question-blind Q-Former
    task = VqaTask(net, start.tokenizer, qtok, replace(recipe.stage2, seed=recipe.train.seed))
    if "language_model" in start.frozen_sources:
        sources["language_model"] = start.frozen_sources["language_model"]
    return task, Checkpoint(net, net.config, start.tokenizer, qtok, "vqa-finetuned", "vqa", sources)


class QuestionSide:
    """Gives a stage-2 model's Q-Former the text side it reads questions with (or takes it away, for the
    question-blind ablation): ``adapt(config, state, start)`` returns the new config and weights."""

    def __init__(self, wanted: bool, text_init: str | None, init: str) -> None:
        self.wanted, self.text_init, self.init = wanted, text_init, init
        self.tokenizer: Any = None

    def adapt(self, cfg: Blip2Config, state: dict[str, torch.Tensor],
              start: Checkpoint) -> tuple[Blip2Config, dict[str, torch.Tensor]]:
        from ..models.resolve import load_checkpoint

        if not self.wanted:  # question-blind: the plain query path of a stage-2 model
            qformer = replace(cfg.qformer, has_text=False, has_lm_head=False)
            kept = {k: v for k, v in state.items() if not _text_side(k)}
            return replace(cfg, qformer=qformer, qformer_text_input=False), kept
        if cfg.qformer_text_input:
            self.tokenizer = start.qformer_tokenizer
            return cfg, state
        if not self.text_init:
            raise Blip2Error(f"--init {self.init}: its Q-Former has no text side to read the question with; name the "
                             "stage-1 model it came from in model.qformer_text_init (lavis-stage1-vit-g, "
                             "runs/<stage1 run>/latest), or --set model.question_in_qformer=false")
        first = load_checkpoint(self.text_init, dtype=torch.float32)
        if not isinstance(first.net, Blip2Stage1) or first.qformer_tokenizer is None:
            raise Blip2Error(f"model.qformer_text_init {self.text_init}: not a stage-1 model (with a Q-Former text "
                             "side)")
        theirs = first.config.qformer
        if (theirs.hidden_size, theirs.num_layers) != (cfg.qformer.hidden_size, cfg.qformer.num_layers):
            raise Blip2Error(f"model.qformer_text_init {self.text_init}: its Q-Former ({theirs.num_layers} layers of "
                             f"{theirs.hidden_size}) is not the one of --init {self.init}")
        qformer = replace(cfg.qformer, has_text=True, has_lm_head=False, vocab_size=theirs.vocab_size,
                          max_position_embeddings=theirs.max_position_embeddings, max_txt_len=theirs.max_txt_len,
                          pad_token_id=theirs.pad_token_id)
        text = {k: v for k, v in first.net.state_dict().items() if _text_side(k) and ".lm_head." not in k}
        self.tokenizer = first.qformer_tokenizer
        return replace(cfg, qformer=qformer, qformer_text_input=True), {**state, **text}


def _text_side(key: str) -> bool:
    """The Q-Former's text-only weights: word and position embeddings, text FFNs (and an ITG head)."""
    return key.startswith("qformer.") and any(p in key for p in (".embeddings.", ".text_ffn.", ".lm_head."))
