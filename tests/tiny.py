"""Tiny random BLIP-2 checkpoints (transformers' format and LAVIS's), tokenizers and images, built offline for
the tests; and the inputs transformers' processor builds for them."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from blip2cli.models.vision import VisionConfig

CORPUS = [
    "a photo of a red circle on a table",
    "a green square next to a blue triangle",
    "question: what is on the table? short answer: a cat",
    "two dogs are playing in the park with a ball",
    "the man is riding a horse on the beach at sunset",
    "a yellow car parked in front of a house\n",
    "what colour is the sky? it is blue.\n",
] * 20

IMAGE_SIZE = 32
NUM_QUERIES = 4
# prompts and texts the tiny models are compared on, against transformers and LAVIS
PROMPTS = ["", "a photo of", "question: what is on the table? short answer:", "two dogs"]
TEXTS = ["a red circle on a table", "two dogs playing", "a yellow car", "the man is riding a horse"]
# the vision tower of the tiny checkpoints, as a LAVIS file needs it named
TINY_VIT = VisionConfig(kind="eva", image_size=IMAGE_SIZE, patch_size=8, width=32, layers=2, heads=4, mlp_dim=64)


def _bpe(specials: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def opt_tokenizer():
    """GPT-2 style byte-level BPE as OPT uses it: ``</s>`` (2) prepended as BOS, pad 1."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(["<s>", "<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def t5_tokenizer():
    """T5 style: ``</s>`` (1) appended, pad 0, no BOS."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def bert_tokenizer():
    """BERT uncased style WordPiece with [DEC] added as BOS, as BLIP-2's Q-Former tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # a fixed vocabulary rather than a trained one: WordPiece training breaks ties differently in every
    # process, and tests compare runs across processes
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({w for text in CORPUS
                    for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))})
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars),
             *(w for w in words if len(w) > 1)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.add_special_tokens({"bos_token": "[DEC]"})
    return fast


def _vision_and_qformer(qformer_vocab: int, text_input: bool) -> dict:
    return dict(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            cross_attention_frequency=2, vocab_size=qformer_vocab,
                            use_qformer_text_input=text_input, max_position_embeddings=64),
        num_query_tokens=NUM_QUERIES,
    )


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Give every tensor non-trivial values (the HF init leaves zeros and ones that hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def make_hf_opt(path: Path, seed: int = 0) -> Path:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    tok = opt_tokenizer()
    nl = tok.convert_tokens_to_ids("Ċ")
    text = OPTConfig(vocab_size=512, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, bos_token_id=2, eos_token_id=nl,
                     pad_token_id=1)
    cfg = Blip2Config(**_vision_and_qformer(64, False), text_config=text.to_dict(),
                      image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(cfg).eval()
    _randomise(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_hf_t5(path: Path, seed: int = 1) -> Path:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, T5Config

    tok = t5_tokenizer()
    text = T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                    num_heads=4, feed_forward_proj="gated-gelu", dense_act_fn="gelu", decoder_start_token_id=0,
                    pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    cfg = Blip2Config(**_vision_and_qformer(64, False), text_config=text.to_dict(),
                      image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(cfg).eval()
    _randomise(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_hf_itm(path: Path, seed: int = 2) -> Path:
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    tok = bert_tokenizer()
    cfg = Blip2Config(**_vision_and_qformer(len(tok), True), image_text_hidden_size=16)
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(cfg).eval()
    _randomise(model, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def draw_image(i: int, size: int = 48) -> Image.Image:
    """A small picture that differs with ``i``: a coloured shape on a coloured background."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    im = Image.new("RGB", (size + 7 * (i % 3), size), colours[(i + 3) % len(colours)])
    d = ImageDraw.Draw(im)
    box = (4 + i % 5, 6, size - 6, size - 4 - i % 4)
    [d.ellipse, d.rectangle, d.polygon][i % 3](box if i % 3 < 2 else [(box[0], box[3]), (box[2], box[3]),
                                                                       ((box[0] + box[2]) // 2, box[1])],
                                               fill=colours[i % len(colours)])
    return im


def make_blip_captioner(path: Path, seed: int = 3) -> Path:
    """A tiny random transformers BLIP captioning model with its processor (32 px images)."""
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, \
        BlipProcessor

    words = bert_tokenizer()
    tok = BertTokenizerFast(tokenizer_object=words.backend_tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]")
    text = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, encoder_hidden_size=32, bos_token_id=tok.bos_token_id,
                sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=8)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    _randomise(model, seed)
    model.save_pretrained(path)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                              tokenizer=tok)
    processor.save_pretrained(path)
    return path


def make_endings_likely(path: Path, bias: float) -> Path:
    """Add ``bias`` to a saved BLIP captioner's end-token logit, in place, so that captions of random weights
    end at various lengths as real captions do, instead of all running to the maximum length."""
    from transformers import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(path)
    with torch.no_grad():
        model.text_decoder.cls.predictions.decoder.bias[model.config.text_config.sep_token_id] += bias
    model.save_pretrained(path)
    return path


def make_open_clip(path: Path, seed: int = 4) -> Path:
    """A tiny random open_clip CLIP in the hub layout (``open_clip_config.json`` + weights), loadable with
    ``local-dir:``; it uses open_clip's own BPE tokenizer, which ships with the package."""
    import json

    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    _randomise(model, seed)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    return path


def hf_inputs(model_dir, blip, images, prompts):
    """What Blip2Processor builds: ``<image>`` x N in front of the tokenized (padded) prompts."""
    tok = blip.checkpoint.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True)
    n = len(prompts)
    image_ids = torch.full((n, NUM_QUERIES), blip.config.image_token_id)
    return dict(pixel_values=blip.pixel_values(images), input_ids=torch.cat([image_ids, enc.input_ids], 1),
                attention_mask=torch.cat([torch.ones(n, NUM_QUERIES, dtype=torch.long), enc.attention_mask], 1))


def write_lavis(blip, path, llm_kind: str | None, tied_llm_copies: bool = False) -> None:
    """A loaded model's tensors under LAVIS's names, as a LAVIS ``.pth``: the inverse of the documented mapping.

    ``tied_llm_copies``: as LAVIS's runner saves, which keeps ``state_dict()`` minus the frozen entries of
    ``named_parameters()``; that lists a tied weight once, so the LLM's tied aliases stay in the file.
    """
    from blip2cli.models import keymaps

    net = blip.net
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("language_model.")}
    vision = {k: v for k, v in keymaps.split_qkv_bias(state).items() if k.startswith("vision.")}
    vision = {k: v for k, v in vision.items() if not k.endswith("k_bias")}
    # LAVIS stores separate q/v biases; the qkv weight carries no bias
    state = {k: v for k, v in state.items() if not k.startswith("vision.")} | vision
    km = keymaps.lavis_keys(llm_kind)
    out = {}
    for k, v in state.items():
        if k == "qformer.lm_head.decoder.weight":
            continue
        new = km.to_theirs(k)
        assert new is not None, k
        out[new] = v.clone()
    if "qformer.embeddings.word.weight" in state:
        out["Qformer.bert.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    if tied_llm_copies:
        lm = net.language_model.model
        frozen = {name for name, _ in lm.named_parameters()}
        prefix = "t5_model." if llm_kind == "t5" else "opt_model."
        out |= {prefix + k: v.clone() for k, v in lm.state_dict().items() if k not in frozen}
    torch.save({"model": out, "epoch": 3}, path)


def llm_dir(blip, path):
    """A loaded model's LM on its own, as a transformers directory (what ``--llm`` names)."""
    blip.net.language_model.model.save_pretrained(path)
    blip.checkpoint.tokenizer.save_pretrained(path)
    return path
