"""Stand-ins for the pretrained parts in the CPU-sized ``tiny`` recipes.

Word-level tokenizers over the synthetic captions' vocabulary (deterministic: no training), and a
small OPT language model pre-trained on the caption text so that stage 2 has a frozen LLM that knows
the language, as OPT knows English.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

# The tiny world: the colours and shapes the synthetic images show (``blip2cli.data.synthetic``) and every
# word their captions and questions use.
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
WORDS = ["a", "an", "the", "of", "photo", "picture", *COLOURS, *SHAPES, "question", "what", "colour", "shape", "is",
         "it", "this", "answer", "short", "?", ":"]


def _word_level(specials: list[str], template: str | None, extra: list[str] = ()):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(specials + list(extra) + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[-1] if "[UNK]" in specials[-1:] else "<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if template:
        specials_in = [s for s in specials if s in template]
        tok.post_processor = processors.TemplateProcessing(single=template,
                                                           special_tokens=[(s, vocab[s]) for s in specials_in])
    return tok


def qformer_tokenizer():
    """BERT-like: [PAD]=0, [CLS] ... [SEP], [DEC] as BOS."""
    from transformers import PreTrainedTokenizerFast

    tok = _word_level(["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[UNK]"], "[CLS] $A [SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   mask_token="[MASK]", bos_token="[DEC]", unk_token="[UNK]")


def llm_tokenizer():
    """OPT-like: ``</s>`` (2) prepended as BOS, pad 1, and a newline token that ends captions."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = _word_level(["<s>", "<pad>", "</s>", "<unk>"], "</s> $A")
    tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _lm_sample(captions: list[str], rng: random.Random) -> tuple[str, str]:
    """(context, caption): a random-length context of filler words that usually ends by naming the
    caption's colour and shape, as in "what is it red circle : " before "a red circle".

    The context teaches positions beyond a short caption and, as pretraining teaches a real LLM, to draw
    on what came before: what stage 2 needs from a frozen LLM reading a visual prompt.
    """
    filler = [w for w in WORDS if w not in COLOURS + SHAPES]
    caption = rng.choice(captions)
    context = [rng.choice(filler) for _ in range(rng.randint(0, 10))]
    if rng.random() < 0.7:
        context += caption.split()[1:] + [":"]
    return " ".join(context), caption + "\n"


@dataclass
class TinyLLM:
    """The small OPT of the tiny stage-2 recipe (``model.tiny_llm`` in ``recipes/tiny/stage2.yaml``): its shape and
    how long it is pretrained on the captions."""

    hidden_size: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    steps: int  # AdamW steps
    batch_size: int  # samples per step
    lr: float


def shipped_tiny_llm() -> TinyLLM:
    """The tiny LLM of the shipped recipe ``tiny/stage2``."""
    from ..config import from_dict, read_yaml, recipe_path

    return from_dict(TinyLLM, read_yaml(recipe_path("tiny/stage2"))["model"]["tiny_llm"], "tiny/stage2.model.tiny_llm")


def pretrain_llm(captions: list[str], out: Path, settings: TinyLLM | None = None, seed: int = 0,
                 steps: int | None = None) -> Path:
    """Train a small OPT to write ``captions`` (ending in a newline) after a context; save it with its
    tokenizer. The loss covers the caption only. ``settings``: its shape and training (default: the shipped tiny
    recipe's); ``steps`` replaces theirs."""
    from transformers import OPTConfig, OPTForCausalLM

    s = settings or shipped_tiny_llm()
    if steps is not None:
        s = replace(s, steps=steps)
    tok = llm_tokenizer()
    newline = tok.convert_tokens_to_ids("\n")
    config = OPTConfig(vocab_size=len(tok), hidden_size=s.hidden_size, word_embed_proj_dim=s.hidden_size,
                       ffn_dim=s.ffn_dim, num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                       max_position_embeddings=s.max_position_embeddings, bos_token_id=2, eos_token_id=newline,
                       pad_token_id=1, dropout=0.0)
    torch.manual_seed(seed)
    model = OPTForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr)
    rng = random.Random(seed)
    tok.padding_side = "right"
    for _ in range(s.steps):
        samples = [_lm_sample(captions, rng) for _ in range(s.batch_size)]
        enc = tok([f"{c} {t}".lstrip() for c, t in samples], return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        for i, (context, _) in enumerate(samples):
            labels[i, :len(tok(context).input_ids)] = -100  # BOS and context
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    _save_atomically(out, [model, tok])
    return out


def _save_atomically(out: Path, parts: list) -> None:
    """``save_pretrained`` each part into a temporary sibling of ``out``, then rename it to ``out``: a kill
    midway leaves no half-written ``out``. A complete ``out`` written meanwhile (by another run) is kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for part in parts:
            part.save_pretrained(tmp)
        if (out / "config.json").exists():
            return
        if out.exists():  # an incomplete directory from an older blip2: replace it
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").exists():  # not another run's complete copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
