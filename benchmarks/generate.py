"""Generation speed and memory: transformers' Blip2ForConditionalGeneration against blip2, same weights.

Builds one random mid-size BLIP-2 (12-layer 768-wide ViT, BERT-base Q-Former, a 125M OPT), saves it,
then runs each implementation in its own process (so each peak RSS is its own): batch 8, 5 beams,
20 new tokens. Prints images/s, the ratio and peak memory, and checks the texts are identical.

    python -m benchmarks.generate [--device cuda --dtype bfloat16] [--full]

``--full`` uses the blip2-opt-2.7b architecture (for a GPU).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._memory import peak_rss_mib
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


def run_side(side: str, path: str, device: str, dtype: str, batch: int, repeats: int, queue) -> None:
    import torch

    import blip2cli

    blip = blip2cli.load(path, device=device, dtype=dtype)  # tokenizer and transform, shared by both sides
    pics = images(batch, 224)
    prompts = PROMPTS[:batch]
    settings = dict(num_beams=5, max_new_tokens=20, min_new_tokens=20, length_penalty=1.0)
    if side == "transformers":
        from transformers import Blip2ForConditionalGeneration

        del blip.net
        ref = Blip2ForConditionalGeneration.from_pretrained(path, dtype=blip.dtype).to(blip.device).eval()
        tok = blip.checkpoint.tokenizer
        n = ref.config.num_query_tokens

        def step():
            enc = tok(prompts, return_tensors="pt", padding=True)
            ids = torch.cat([torch.full((batch, n), ref.config.image_token_id), enc.input_ids], 1).to(blip.device)
            mask = torch.cat([torch.ones(batch, n, dtype=torch.long), enc.attention_mask], 1).to(blip.device)
            pixels = blip.pixel_values(pics).to(blip.dtype)
            with torch.inference_mode():
                out = ref.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                   pad_token_id=tok.pad_token_id, **settings)
            return [t.strip() for t in tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
    else:
        def step():
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
    queue.put(dict(side=side, images_per_s=batch * repeats / elapsed, texts=texts,
                   peak_rss_mib=peak_rss_mib(), peak_gpu_mib=peak_gpu))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="the blip2-opt-2.7b architecture")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        build_checkpoint(path, args.full)
        results = {}
        for side in ("transformers", "blip2"):
            queue = ctx.Queue()
            proc = ctx.Process(target=run_side, args=(side, str(path), args.device, args.dtype, args.batch,
                                                      args.repeats, queue))
            proc.start()
            results[side] = queue.get()
            proc.join()
    ref, ours = results["transformers"], results["blip2"]
    same = ref["texts"] == ours["texts"]
    report = {
        "config": "blip2-opt-2.7b" if args.full else "mid (ViT 12x768, Q-Former BERT-base, OPT-125M)",
        "device": args.device, "dtype": args.dtype, "batch": args.batch, "beams": 5, "new_tokens": 20,
        "transformers_images_per_s": round(ref["images_per_s"], 3), "blip2_images_per_s": round(ours["images_per_s"], 3),
        "speed_ratio": round(ours["images_per_s"] / ref["images_per_s"], 3),
        "transformers_peak_rss_mib": round(ref["peak_rss_mib"]), "blip2_peak_rss_mib": round(ours["peak_rss_mib"]),
        "transformers_peak_gpu_mib": ref["peak_gpu_mib"], "blip2_peak_gpu_mib": ours["peak_gpu_mib"],
        "texts_identical": same,
    }
    print(json.dumps(report, indent=2))
    if not same:
        for a, b in zip(ref["texts"], ours["texts"]):
            if a != b:
                print(f"differs: {a!r} vs {b!r}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
