"""Peak memory while loading a checkpoint from disk, against the size of its weights.

Writes a random BLIP-2 checkpoint (default: the full blip2-opt-2.7b architecture in float16, about
7.5 GB), then loads it in a fresh process with transformers and with blip2, and reports each peak RSS
above the process's baseline (after imports) as a multiple of the weights' size. A loader that builds
on the meta device and adopts the loaded tensors stays near 1.0; one that initialises the model and
then copies weights in approaches 2.0.

    python -m benchmarks.load_memory [--mid] [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
from pathlib import Path

from benchmarks._memory import peak_rss_mib, rss_mib


def write_checkpoint(path: Path, mid: bool, dtype: str) -> float:
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    from tests.tiny import opt_tokenizer

    tok = opt_tokenizer()
    if mid:
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16)
        text = OPTConfig(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                         word_embed_proj_dim=768, vocab_size=50272)
    else:
        vision = {}
        text = OPTConfig(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                         word_embed_proj_dim=2560, vocab_size=50304, eos_token_id=50118)
    cfg = Blip2Config(vision_config=vision, text_config=text.to_dict(),
                      image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.set_default_dtype(getattr(torch, dtype))
    model = Blip2ForConditionalGeneration(cfg).eval()
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def load_side(side: str, path: str, dtype: str, queue) -> None:
    import open_clip  # noqa: F401  (imports are not loading: both sides pay them before the baseline)
    import timm  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Blip2ForConditionalGeneration  # noqa: F401

    import blip2cli
    from blip2cli.runtime.progress import quiet_transformers

    import blip2cli.models.hub  # noqa: F401

    quiet_transformers()
    base = rss_mib()
    if side == "transformers":
        from transformers import Blip2ForConditionalGeneration

        model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype))
    else:
        model = blip2cli.load(path, device="cpu", dtype=dtype)
    peak = peak_rss_mib()
    # safetensors maps the file: pages arrive on first use. Touch every weight, then look again: a
    # loader that kept no second copy now holds about the weights' size.
    net = model if side == "transformers" else model.net
    with torch.no_grad():
        for p in net.parameters():
            p.sum()  # no float copy: only the pages themselves
    touched = peak_rss_mib() - base
    queue.put(dict(touched_mib=touched, side=side, peak_above_baseline_mib=peak - base, resident_after_mib=rss_mib() - base,
                   base=base, peak=peak))
    del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mid", action="store_true", help="a mid-size model instead of blip2-opt-2.7b")
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        size = write_checkpoint(path, args.mid, args.dtype)
        report: dict = {"config": "mid" if args.mid else "blip2-opt-2.7b", "dtype": args.dtype,
                        "weights_mib": round(size)}
        for side in ("transformers", "blip2"):
            queue = ctx.Queue()
            proc = ctx.Process(target=load_side, args=(side, str(path), args.dtype, queue))
            proc.start()
            result = queue.get()
            proc.join()
            report[f"{side}_peak_mib"] = round(result["peak_above_baseline_mib"])
            report[f"{side}_peak_after_touching_every_weight_mib"] = round(result["touched_mib"])
            report[f"{side}_touched_over_weights"] = round(result["touched_mib"] / size, 3)
            report[f"{side}_resident_after_mib"] = round(result["resident_after_mib"])
            report[f"{side}_peak_over_weights"] = round(result["peak_above_baseline_mib"] / size, 3)
            # the loaded model can be larger than the file: the Q-Former is kept in float32
            report[f"{side}_peak_over_loaded_model"] = round(
                result["peak_above_baseline_mib"] / result["resident_after_mib"], 3)
        report["peak_ratio_blip2_over_transformers"] = round(report["blip2_peak_mib"] / report["transformers_peak_mib"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
