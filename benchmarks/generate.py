"""Generation speed and memory: transformers' Blip2ForConditionalGeneration against blip2, same weights.

Builds one random mid-size BLIP-2 (12-layer 768-wide ViT, BERT-base Q-Former, a 125M OPT), saves it,
then runs the two implementations alternately over ``--rounds`` rounds, each run in a fresh process (so each
peak RSS is its own): batch 8, 5 beams, 20 new tokens. Prints each side's best round in images/s with the
spread across rounds, the ratio of the best rounds, peak memory (the largest over rounds), and the arithmetic
each side does per image (torch's FLOP counter over one more, untimed batch) with the rate its best round
sustains. Checks that every round of both sides generates the same texts (exit 1 otherwise).

    python -m benchmarks.generate [--device cuda --dtype bfloat16] [--full] [--rounds 3]

``--full`` uses the blip2-opt-2.7b architecture (for a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._memory import peak_rss_mib
from benchmarks._rounds import add_rounds_argument, alternate, spawn
from benchmarks._weights import randomise

PROMPTS = ["", "a photo of", "Question: what is on the table? Short answer:", "two dogs",
           "the man is", "Question: what colour is the car? Answer:", "a picture of", "this is"]


def build_checkpoint(path: Path, full: bool) -> None:
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    from tests.tiny import opt_tokenizer

    tok = opt_tokenizer()
    if full:
        vision, qformer = {}, {}
        text = OPTConfig(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                         word_embed_proj_dim=2560, vocab_size=50304, eos_token_id=50118, bos_token_id=2,
                         pad_token_id=1)
    else:
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16)
        qformer = dict(num_hidden_layers=12)
        text = OPTConfig(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                         word_embed_proj_dim=768, vocab_size=50272, bos_token_id=2, pad_token_id=1,
                         eos_token_id=tok.convert_tokens_to_ids("Ċ"))
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                      image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(cfg).eval()
    randomise(model)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def images(n: int, size: int):
    from tests.tiny import draw_image

    return [draw_image(i, size=size) for i in range(n)]


def load_reference(path: str, blip):
    """transformers' model of the checkpoint at ``path`` on ``blip``'s device and dtype; ``blip`` keeps only its
    tokenizer and image transform."""
    from transformers import Blip2ForConditionalGeneration

    del blip.net
    return Blip2ForConditionalGeneration.from_pretrained(path, dtype=blip.dtype).to(blip.device).eval()


def reference_generate(ref, blip, pics: list, prompts: list[str], **settings: Any) -> list[str]:
    """transformers' texts for ``pics`` and ``prompts``: the image tokens before each prompt, pixels from blip2's
    transform, the prompt stripped from the output."""
    import torch

    tok, n, batch = blip.checkpoint.tokenizer, ref.config.num_query_tokens, len(prompts)
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids = torch.cat([torch.full((batch, n), ref.config.image_token_id), enc.input_ids], 1).to(blip.device)
    mask = torch.cat([torch.ones(batch, n, dtype=torch.long), enc.attention_mask], 1).to(blip.device)
    pixels = blip.pixel_values(pics).to(blip.dtype)
    with torch.inference_mode():
        out = ref.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, pad_token_id=tok.pad_token_id,
                           **settings)
    return [t.strip() for t in tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]


def run_side(side: str, path: str, device: str, dtype: str, batch: int, repeats: int, count_flops: bool,
             queue) -> None:
    """One round of one side: a warm-up batch, then ``repeats`` timed batches; with ``count_flops``, one more
    untimed batch under torch's FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import blip2cli

    blip = blip2cli.load(path, device=device, dtype=dtype)  # tokenizer and transform, shared by both sides
    pics = images(batch, 224)
    prompts = PROMPTS[:batch]
    settings = dict(num_beams=5, max_new_tokens=20, min_new_tokens=20, length_penalty=1.0)
    if side == "transformers":
        ref = net = load_reference(path, blip)

        def step() -> list[str]:
            return reference_generate(ref, blip, pics, prompts, **settings)
    else:
        net = blip.net

        def step() -> list[str]:
            return blip.generate(pics, prompts, batch_size=batch, **settings)

    texts = step()  # warm-up
    sync = torch.cuda.synchronize if blip.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    elapsed = time.perf_counter() - start
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if blip.device.type == "cuda" else None
    result = dict(images_per_s=batch * repeats / elapsed, texts=texts, peak_rss_mib=peak_rss_mib(),
                  peak_gpu_mib=peak_gpu, flops_per_image=None)
    if count_flops:
        net.requires_grad_(False)  # the counter's module hooks fail on parameters that want gradients
        with FlopCounterMode(display=False) as counter:
            step()
        result["flops_per_image"] = counter.get_total_flops() / batch
    queue.put(result)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype`` and ``--full`` (the checkpoint ``build_checkpoint`` makes)."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--full", action="store_true", help="the blip2-opt-2.7b architecture")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per round")
    add_rounds_argument(parser)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        build_checkpoint(path, args.full)

        def side(name: str) -> Callable[[int], dict]:
            """Counts the arithmetic in the first round only."""
            return lambda r: spawn(run_side, name, str(path), args.device, args.dtype, args.batch, args.repeats, r == 0)

        rounds = alternate({name: side(name) for name in ("transformers", "blip2")}, args.rounds)
    report = {
        "config": "blip2-opt-2.7b" if args.full else "mid (ViT 12x768, Q-Former BERT-base, OPT-125M)",
        "device": args.device, "dtype": args.dtype, "batch": args.batch, "beams": 5, "new_tokens": 20,
        "rounds": args.rounds, "repeats_per_round": args.repeats,
        **rounds.timing("images_per_s"),
        "speed_ratio_of_best_rounds": round(rounds.ratio("blip2", "transformers", "images_per_s"), 3),
        **rounds.peaks("peak_rss_mib"), **rounds.peaks("peak_gpu_mib"),
    }
    for name in rounds.runs:
        flops = rounds.runs[name][0]["flops_per_image"]
        report[f"{name}_gflop_per_image"] = round(flops / 1e9, 2)
        report[f"{name}_gflop_per_s_best_round"] = round(flops * rounds.best(name, "images_per_s") / 1e9, 1)
    differing = rounds.differing("texts")
    report["texts_identical"] = not differing
    print(json.dumps(report, indent=2))
    if differing:
        expected = rounds.runs["transformers"][0]["texts"]
        for side, r in differing:
            for a, b in zip(expected, rounds.runs[side][r]["texts"]):
                if a != b:
                    print(f"differs ({side}, round {r + 1}): {a!r} vs {b!r}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
