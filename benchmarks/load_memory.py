"""Peak memory while loading a checkpoint from disk, against the size of its weights.

Writes a random BLIP-2 checkpoint (default: the full blip2-opt-2.7b architecture in float16, about
7.5 GB), then loads it with transformers and with blip2, alternately over ``--rounds`` rounds, each load in a
fresh process, and reports each side's peak RSS above the process's baseline (after imports) as a multiple of
the weights' size. Every memory figure is the largest over the rounds (``_max_over_rounds``), with the peak's
spread across rounds. A loader that builds on the meta device and adopts the loaded tensors stays near 1.0;
one that initialises the model and then copies weights in approaches 2.0.

    python -m benchmarks.load_memory [--mid] [--dtype float16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks._memory import peak_rss_mib, rss_mib
from benchmarks._rounds import add_rounds_argument, alternate, spawned


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
    add_rounds_argument(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        size = write_checkpoint(path, args.mid, args.dtype)
        sides = {side: spawned(load_side, side, str(path), args.dtype) for side in ("transformers", "blip2")}
        rounds = alternate(sides, args.rounds)
    report: dict = {"config": "mid" if args.mid else "blip2-opt-2.7b", "dtype": args.dtype, "weights_mib": round(size),
                    "rounds": args.rounds}
    for side in rounds.runs:
        peak, touched, resident = (rounds.peak(side, key) for key in
                                   ("peak_above_baseline_mib", "touched_mib", "resident_after_mib"))
        report[f"{side}_peak_mib_max_over_rounds"] = round(peak)
        report[f"{side}_peak_mib_spread_pct"] = round(rounds.spread_pct(side, "peak_above_baseline_mib"), 1)
        report[f"{side}_peak_mib_rounds"] = [round(v) for v in rounds.values(side, "peak_above_baseline_mib")]
        report[f"{side}_peak_after_touching_every_weight_mib_max_over_rounds"] = round(touched)
        report[f"{side}_touched_over_weights"] = round(touched / size, 3)
        report[f"{side}_resident_after_mib_max_over_rounds"] = round(resident)
        report[f"{side}_peak_over_weights"] = round(peak / size, 3)
        # the loaded model can be larger than the file: the Q-Former is kept in float32 (within each round)
        report[f"{side}_peak_over_loaded_model_max_over_rounds"] = round(max(
            p / r for p, r in zip(rounds.values(side, "peak_above_baseline_mib"),
                                  rounds.values(side, "resident_after_mib"))), 3)
    report["peak_ratio_blip2_over_transformers"] = round(
        report["blip2_peak_mib_max_over_rounds"] / report["transformers_peak_mib_max_over_rounds"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
