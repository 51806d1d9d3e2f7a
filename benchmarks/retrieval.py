"""Retrieval memory and time: blip2's two-pass top-k re-ranking against the reference approach (LAVIS
``compute_sim_matrix``: every image's ViT tokens kept for the ITM stage), same random weights.

The sides run alternately over ``--rounds`` rounds, each run in a fresh process (its own peak RSS). blip2 also
runs on a quarter of the images, as a third side, to show that its peak does not grow with the number of
images. Prints each side's best round in seconds with the spread across rounds, the time ratio of the best
rounds, and each side's peak memory as the largest over rounds.

    python -m benchmarks.retrieval [--images 1000 --texts 5000 --k 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks._memory import peak_rss_mib, rss_mib
from benchmarks._rounds import add_rounds_argument, alternate, spawned


def build():
    import torch

    from blip2cli.api import Blip2
    from blip2cli.models.blip2 import Blip2Config, Blip2Stage1
    from blip2cli.models.assemble import Checkpoint
    from blip2cli.models.qformer import QFormerConfig
    from blip2cli.models.tiny import qformer_tokenizer
    from blip2cli.models.vision import VisionConfig

    tok = qformer_tokenizer()
    cfg = Blip2Config(vision=VisionConfig(kind="eva", image_size=224, patch_size=16, width=256, layers=4, heads=4,
                                          mlp_dim=1024),
                      qformer=QFormerConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                                            encoder_width=256, num_query_tokens=16, vocab_size=len(tok),
                                            max_position_embeddings=64, has_lm_head=False),
                      embed_dim=128)
    torch.manual_seed(0)
    net = Blip2Stage1(cfg).eval()
    return Blip2(Checkpoint(net, cfg, None, tok, None, "benchmark"), torch.device("cpu"), torch.float32)


def inputs(n_images: int, n_texts: int):
    import random

    from PIL import Image

    from blip2cli.models.tiny import WORDS

    rng = random.Random(0)
    images = [Image.new("RGB", (224, 224), tuple(rng.randrange(256) for _ in range(3))) for _ in range(n_images)]
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n_texts)]
    return images, texts


def reference(model, images, texts, k: int, batch: int):
    """The reference approach: all ViT tokens kept, full ITC matrix, then ITM on the top k."""
    import torch

    net = model.matching_network()
    enc = model.checkpoint.qformer_tokenizer(texts, padding="max_length", truncation=True, max_length=35,
                                             return_tensors="pt")
    with torch.inference_mode():
        text_feats = torch.cat([net.text_features(enc.input_ids[s:s + 256], enc.attention_mask[s:s + 256])
                                for s in range(0, len(texts), 256)])
        embeds, feats = [], []
        for s in range(0, len(images), batch):
            e = model.image_embeds(images[s:s + batch])
            embeds.append(e)
            feats.append(net.image_features(e))
        embeds, feats = torch.cat(embeds), torch.cat(feats)
        sims = net.similarity(feats, text_feats)
        i2t = torch.full_like(sims, -100.0)
        for i in range(len(images)):
            top = sims[i].topk(k)
            for s in range(0, k, 128):
                t = top.indices[s:s + 128]
                logits = net.itm_logits(embeds[i].expand(len(t), -1, -1), enc.input_ids[t], enc.attention_mask[t])
                i2t[i, t] = logits[:, 1] + top.values[s:s + 128]
        t2i = torch.full_like(sims.T, -100.0)
        for t in range(len(texts)):
            top = sims[:, t].topk(k)
            logits = net.itm_logits(embeds[top.indices], enc.input_ids[t].expand(k, -1), enc.attention_mask[t].expand(k, -1))
            t2i[t, top.indices] = logits[:, 1] + top.values
    return i2t, t2i


def side(name: str, n_images: int, n_texts: int, k: int, batch: int, queue) -> None:
    import torch

    from blip2cli.eval.retrieval import retrieval_scores

    torch.set_num_threads(2)
    model = build()
    images, texts = inputs(n_images, n_texts)
    base = rss_mib()
    start = time.perf_counter()
    if name == "reference":
        i2t, _ = reference(model, images, texts, k, batch)
        top1 = i2t.argmax(1).tolist()
    else:
        scores = retrieval_scores(model, images, texts, k=k, batch_size=batch)
        top1 = [scores.image_ranking(i)[0] for i in range(n_images)]
    queue.put({"seconds": time.perf_counter() - start, "peak_mib": peak_rss_mib() - base, "top1": top1})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--texts", type=int, default=5000)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    add_rounds_argument(parser)
    args = parser.parse_args()
    rounds = alternate({"reference": spawned(side, "reference", args.images, args.texts, args.k, args.batch),
                        "blip2": spawned(side, "blip2", args.images, args.texts, args.k, args.batch),
                        "blip2_quarter_images": spawned(side, "blip2", args.images // 4, args.texts, args.k,
                                                        args.batch)}, args.rounds)
    peak = {name: rounds.peak(name, "peak_mib") for name in rounds.runs}
    time_ratio = rounds.ratio("blip2", "reference", "seconds", higher=False)
    report = {
        "images": args.images, "texts": args.texts, "k": args.k, "rounds": args.rounds,
        **rounds.timing("seconds", higher=False, digits=2),
        "time_ratio_blip2_over_reference_best_rounds": round(time_ratio, 3),
        **rounds.peaks("peak_mib"),
        "memory_ratio_blip2_over_reference_max_over_rounds": round(peak["blip2"] / peak["reference"], 3),
        "same_top1_texts_every_round": not rounds.differing("top1", sides=["reference", "blip2"]),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
