"""Generation at full size on a GPU: transformers' Blip2ForConditionalGeneration against blip2, same random weights.

For blip2-opt-2.7b and blip2-flan-t5-xl (ViT-g, the BERT-base Q-Former, the LLM at its real size) in bf16, batch
16 and 64, 5 beams, 20 new tokens: each model is built once and both sides run in one process, alternating
A B A B over ``--rounds`` rounds (both stay resident, so the memory figure of a side is its peak above what was
allocated before its call: activations and caches). Prints each side's best round in images/s, the spread across
rounds, the ratio of the best rounds, the peak memory and how many texts of the two sides are identical (bf16
rounds differently when the prompt is computed once per image instead of once per beam).

    python -m benchmarks.generate_full [--models opt t5] [--batches 16 64] [--rounds 3] [--tiny]

``--tiny`` runs the same code on small shapes on the CPU (to check the script, not to measure).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._weights import randomise
from benchmarks.generate import PROMPTS
SETTINGS = dict(num_beams=5, max_new_tokens=20, min_new_tokens=20, length_penalty=1.0)


def build(kind: str, path: Path, tiny: bool, device: str) -> None:
    """A random BLIP-2 of ``kind`` (opt: blip2-opt-2.7b, t5: blip2-flan-t5-xl) saved in bf16 at ``path``."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig, T5Config

    from tests.tiny import opt_tokenizer, t5_tokenizer

    tok = opt_tokenizer() if kind == "opt" else t5_tokenizer()
    vision, qformer = ({}, {}) if not tiny else (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=224,
             patch_size=14), dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  encoder_hidden_size=64))
    if kind == "opt":
        size = dict(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                    word_embed_proj_dim=2560) if not tiny else dict(
            hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64)
        text = OPTConfig(**size, vocab_size=50304, bos_token_id=2, pad_token_id=1,
                         eos_token_id=tok.convert_tokens_to_ids("Ċ"))
    else:
        size = dict(d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32, d_kv=64) \
            if not tiny else dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16)
        text = T5Config(**size, vocab_size=32128, feed_forward_proj="gated-gelu", dense_act_fn="gelu",
                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                        tie_word_embeddings=False)
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                      image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(cfg).eval()
    randomise(model)
    model.to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    del model


def measure(kind: str, batches: list[int], rounds: int, tiny: bool, device: str) -> list[dict]:
    import torch
    from transformers import Blip2ForConditionalGeneration

    import blip2cli
    from tests.tiny import draw_image

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / kind
        build(kind, path, tiny, device)
        blip = blip2cli.load(str(path), device=device, dtype="bfloat16")
        ref = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    tok, n = blip.checkpoint.tokenizer, ref.config.num_query_tokens
    decoder_only = ref.config.use_decoder_only_language_model
    reports = []
    for batch in batches:
        pics = [draw_image(i, size=224) for i in range(batch)]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        enc = tok(prompts, return_tensors="pt", padding=True)
        ids = torch.cat([torch.full((batch, n), ref.config.image_token_id), enc.input_ids], 1).to(device)
        mask = torch.cat([torch.ones(batch, n, dtype=torch.long), enc.attention_mask], 1).to(device)
        pixels = blip.pixel_values(pics).to(torch.bfloat16)

        def transformers_side() -> list[str]:
            with torch.inference_mode():
                out = ref.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                   pad_token_id=tok.pad_token_id, **SETTINGS)
            out = out[:, ids.shape[1]:] if decoder_only else out
            return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

        def blip2_side() -> list[str]:
            return blip.generate(pics, prompts, batch_size=batch, **SETTINGS)

        sides = {"transformers": transformers_side, "blip2": blip2_side}
        texts = {name: side() for name, side in sides.items()}  # warm-up
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        peaks: dict[str, float] = {name: 0.0 for name in sides}
        for _ in range(rounds):
            for name, side in sides.items():
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                start = time.perf_counter()
                side()
                sync()
                seconds[name].append(time.perf_counter() - start)
                if cuda:
                    peaks[name] = max(peaks[name], (torch.cuda.max_memory_allocated() - before) / 2**20)
        best = {name: batch / min(s) for name, s in seconds.items()}
        reports.append({
            "model": {"opt": "blip2-opt-2.7b", "t5": "blip2-flan-t5-xl"}[kind] + (" (tiny shapes)" if tiny else ""),
            "batch": batch, "beams": 5, "new_tokens": 20, "rounds": rounds,
            "transformers_images_per_s": round(best["transformers"], 2), "blip2_images_per_s": round(best["blip2"], 2),
            "speed_ratio": round(best["blip2"] / best["transformers"], 3),
            "spread_pct": {name: round(100 * (max(s) - min(s)) / min(s), 1) for name, s in seconds.items()},
            "peak_above_weights_mib": {name: round(v) for name, v in peaks.items()} if cuda else None,
            "identical_texts": f"{sum(a == b for a, b in zip(texts['transformers'], texts['blip2']))}/{batch}",
        })
        print(json.dumps(reports[-1]), flush=True)
    del blip, ref
    if cuda:
        torch.cuda.empty_cache()
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["opt", "t5"], choices=["opt", "t5"])
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU: checks the script")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    reports = [r for kind in args.models for r in measure(kind, args.batches, args.rounds, args.tiny, device)]
    json.dump(reports, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
