"""CapFilt speed: blip2's batched CapFilt against captioning and ranking one image at a time.

The reference is what a user of transformers and open_clip would write: for each image,
``BlipForConditionalGeneration.generate(do_sample=True, top_k=50, top_p=0.9, num_return_sequences=10)``, then CLIP
on the image and its 11 candidate captions, keeping the best two. blip2 runs ``blip2 prepare capfilt``'s
shard processing (batches of images, one vision pass and one set of cross-attention keys and values per
image, a preallocated self-attention cache, images leaving the batch once their captions end, a hashed
nucleus draw, batched ranking). Both read the same webdataset shard of random images, with the same random
models and decoding settings (the CapFilt recipe's). The two sides run alternately over ``--rounds`` rounds,
each run in a fresh process; the report gives each side's best round in images/s with the spread across
rounds, the ratio of the best rounds, and the arithmetic each side does per image (torch's FLOP counter, on
the warm-up images) with the rate its best round sustains: on CPU both are compute-bound, so the achieved
GFLOP/s shows how close each comes to the machine's matmul throughput.

    python -m benchmarks.capfilt                        # tiny and mid-size models, CPU
    python -m benchmarks.capfilt --size mid --images 64 [--rounds 3]
    python -m benchmarks.capfilt --size full --device cuda --dtype float16   # BLIP-large + CLIP ViT-L/14

Sizes: ``tiny`` (2-layer, 32-wide), ``mid`` (6-layer 384-wide ViTs and decoder, BERT vocabulary),
``full`` (BLIP-large: ViT-L/16 at 384 px and a BERT-base decoder; CLIP ViT-L/14 at 224 px).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks._rounds import add_rounds_argument, alternate, spawn
from benchmarks._weights import randomise

WARM = 2  # warm-up images, also those whose arithmetic is counted
VOCAB = 30524  # BLIP's BERT vocabulary with [DEC] and [ENC]


def bert_vocab_tokenizer(path: Path):
    """A BERT WordPiece tokenizer with BLIP's vocabulary size (synthetic word pieces), so the decoder's
    output layer has its real cost."""
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = ["a", "picture", "of", "photo", "the", "on", "in", "with", "and", "dog", "cat", "table", "red"]
    pieces = [f"w{i}" for i in range(VOCAB - 2 - len(specials) - len(words))]
    tok = BertTokenizerFast(vocab={token: i for i, token in enumerate(specials + words + pieces)}, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    if len(tok) != VOCAB:
        raise RuntimeError(f"the benchmark tokenizer has {len(tok)} tokens, not {VOCAB}")
    return tok


def build_captioner(path: Path, size: str) -> None:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    path.mkdir(parents=True)
    if size == "tiny":
        from tests.tiny import make_blip_captioner

        make_blip_captioner(path)
        return
    tok = bert_vocab_tokenizer(path)
    if size == "mid":
        vision = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                      image_size=224, patch_size=16)
        text = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                    encoder_hidden_size=384)
    else:  # BLIP-large (model_large_caption): ViT-L/16 at 384 px, BERT-base decoder
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=384, patch_size=16)
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    encoder_hidden_size=1024)
    text.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).eval()
    randomise(model)
    model.save_pretrained(path)
    side = vision["image_size"]
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": side, "width": side}),
                  tokenizer=tok).save_pretrained(path)


def mean_caption_tokens(captioner, shard: Path, recipe) -> float:
    """The mean length in tokens, prompt included, of the captions sampled for the images of ``shard``."""
    import torch
    from PIL import Image

    from blip2cli.data.capfilt import read_samples
    from blip2cli.models.sampling import row_seed

    decoding = recipe.decoding
    samples = list(read_samples(shard))
    pixels = torch.stack([captioner.pixels(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples])
    seeds = torch.tensor([row_seed(0, s["__key__"], j) for s in samples for j in range(decoding.num_captions)])
    texts = captioner.sample(pixels, seeds, decoding)
    lengths = [len(captioner.processor.tokenizer(decoding.prompt + t)["input_ids"]) - 1 for t in texts]
    return sum(lengths) / len(lengths)


def build_clip(path: Path, size: str) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    if size == "tiny":
        from tests.tiny import make_open_clip

        make_open_clip(path)
        return
    if size == "mid":
        cfg = {"embed_dim": 256,
               "vision_cfg": {"image_size": 224, "layers": 6, "width": 384, "head_width": 64, "patch_size": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6}}
    else:
        cfg = open_clip.get_model_config("ViT-L-14")
    torch.manual_seed(1)
    model = open_clip.CLIP(**cfg)
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))


def write_shard(path: Path, n: int) -> None:
    import webdataset as wds
    from PIL import Image

    from tests.tiny import draw_image

    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            buf = io.BytesIO()
            draw_image(i, size=256).convert("RGB").resize((320, 256), Image.BICUBIC).save(buf, "JPEG", quality=90)
            sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": f"web caption number {i}",
                        "json": json.dumps({"caption": f"web caption number {i}"})})


def one_at_a_time(shard: Path, captioner, ranker, recipe) -> int:
    """The reference: transformers' sampling and open_clip ranking, image by image."""
    import torch
    from PIL import Image

    from blip2cli.data.capfilt import read_samples, top_captions
    from blip2cli.data.datasets import web_caption
    from blip2cli.models.capfilt_captioner import strip_prompt

    model, processor, d = captioner.model, captioner.processor, recipe.decoding
    done = 0
    for sample in read_samples(shard):
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        inputs = processor(images=image, text=d.prompt, return_tensors="pt").to(captioner.device)
        with torch.inference_mode():
            ids = model.generate(pixel_values=inputs["pixel_values"].to(captioner.dtype), input_ids=inputs["input_ids"],
                                 do_sample=True, top_k=d.top_k, top_p=d.top_p, num_return_sequences=d.num_captions,
                                 max_length=d.max_length, min_length=d.min_length,
                                 repetition_penalty=d.repetition_penalty)
        texts = [strip_prompt(t, d.prompt) for t in processor.batch_decode(ids, skip_special_tokens=True)]
        web = web_caption(sample)
        scores = ranker.scores(ranker.preprocess(image)[None], [[web, *texts]])[0]
        top_captions(web, texts, scores, recipe.keep)
        done += 1
    return done


def capfilt_recipe(root: Path, batch: int, workers: int):
    """The CapFilt recipe over the benchmark's captioner and ranker in ``root``."""
    from blip2cli.config import load_recipe
    from blip2cli.data.capfilt import CapFiltRecipe

    return dataclasses.replace(load_recipe(CapFiltRecipe, "prepare/capfilt"), captioner=str(root / "blip"),
                               ranker=str(root / "clip"), batch_size=batch, workers=workers)


def run_side(side: str, root: str, n: int, batch: int, workers: int, device: str, dtype: str,
             count_tokens: bool, queue) -> None:
    """One round of one side: the warm-up images under torch's FLOP counter, then the timed shard of ``n``
    images; with ``count_tokens``, the mean caption length of the warm-up images too."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from blip2cli.data.capfilt import process_shard
    from blip2cli.models.capfilt_captioner import Captioner
    from blip2cli.models.clip_ranker import Ranker
    from blip2cli.runtime.devices import resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    data = Path(root)
    recipe = capfilt_recipe(data, batch, workers)
    captioner, ranker = Captioner(recipe.captioner, dev, dt), Ranker(recipe.ranker, dev, dt)
    with tempfile.TemporaryDirectory() as out:
        def run(shard: str) -> int:
            if side == "one_at_a_time":
                return one_at_a_time(data / shard, captioner, ranker, recipe)
            return process_shard(data / shard, Path(out) / shard, captioner, ranker, recipe)["captioned"]

        with FlopCounterMode(display=False) as flops:  # also the warm-up
            run("warm.tar")
        tokens = mean_caption_tokens(captioner, data / "warm.tar", recipe) if count_tokens else None
        sync()
        start = time.perf_counter()
        done = run("shard.tar")
        sync()
        elapsed = time.perf_counter() - start
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    queue.put({"images_per_s": done / elapsed, "gflop_per_image": flops.get_total_flops() / WARM / 1e9,
               "mean_caption_tokens": tokens, "peak_gpu_mib": peak_gpu, "device": str(dev),
               "dtype": str(dt).removeprefix("torch.")})


def measure(size: str, n: int, batch: int, workers: int, device: str, dtype: str, end_bias: float,
            rounds: int) -> dict:
    """Both sides on one model size, alternately over ``rounds`` rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_captioner(root / "blip", size)
        if end_bias:
            from tests.tiny import make_endings_likely

            make_endings_likely(root / "blip", end_bias)
        build_clip(root / "clip", size)
        write_shard(root / "shard.tar", n)
        write_shard(root / "warm.tar", WARM)

        def side(name: str) -> Callable[[int], dict]:
            """The caption lengths are read in blip2's first round."""
            return lambda r: spawn(run_side, name, tmp, n, batch, workers, device, dtype, name == "blip2" and r == 0)

        result = alternate({name: side(name) for name in ("one_at_a_time", "blip2")}, rounds)
        captions = capfilt_recipe(root, batch, workers).decoding.num_captions
    first = result.runs["blip2"][0]
    ratio = result.ratio("blip2", "one_at_a_time", "images_per_s")
    report = {"size": size, "device": first["device"], "dtype": first["dtype"], "images": n, "batch": batch,
              "captions_per_image": captions, "end_bias": end_bias,
              "mean_caption_tokens": round(first["mean_caption_tokens"], 1), "rounds": rounds,
              **result.timing("images_per_s"), "ratio_blip2_over_one_at_a_time_best_rounds": round(ratio, 2)}
    for name in result.runs:
        best = result.best_run(name, "images_per_s")
        report[f"{name}_gflop_per_image"] = round(best["gflop_per_image"], 2)
        report[f"{name}_gflop_per_s_best_round"] = round(best["images_per_s"] * best["gflop_per_image"], 1)
    return {**report, **result.peaks("peak_gpu_mib")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "mid", "full", "both"], default="both",
                        help="both: tiny and mid")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="image-decoding processes for blip2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--end-bias", type=float, default=0.0,
                        help="added to the end token's logit so captions end at various lengths, as real ones do "
                             "(0: random weights as they are; their captions run to the maximum length)")
    add_rounds_argument(parser)
    args = parser.parse_args()
    sizes = ["tiny", "mid"] if args.size == "both" else [args.size]
    for size in sizes:
        result = measure(size, args.images, args.batch, args.workers, args.device, args.dtype, args.end_bias,
                         args.rounds)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
