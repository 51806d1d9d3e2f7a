"""Stage-1 training-step throughput and memory: one plain process against DeepSpeed ZeRO-2 and ZeRO-3.

A mid-size stage-1 model (12-layer 384-wide ViT at 224 px, 6-layer 384-wide Q-Former, 32 queries,
32 text tokens) trains on a fixed synthetic batch; the plain process takes the global batch on all
cores, the ZeRO runs take half of it on each of two ranks (gloo on CPU, NCCL on GPUs). The three sides
(plain, ZeRO-2, ZeRO-3) run alternately over ``--rounds`` rounds, each run a fresh launch. Prints each side's
best round in samples/s with the spread across rounds, peak RSS per rank (the largest over rounds) and the
ratios of the best rounds against the plain process.

    python -m benchmarks.train_step [--batch 8] [--steps 5] [--full --device cuda] [--rounds 3]

``--full`` uses the paper's architecture (EVA ViT-g, BERT-base Q-Former) in bf16, for a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks._memory import peak_rss_mib
from benchmarks._rounds import add_rounds_argument, alternate

ROOT = Path(__file__).resolve().parents[1]  # on the workers' PYTHONPATH, for ``-m benchmarks.train_step``


def make_task(full: bool):
    import torch

    from blip2cli.config import load_recipe
    from blip2cli.models.tiny import qformer_tokenizer
    from blip2cli.models.vision import VisionConfig
    from blip2cli.train.build import build_stage1
    from blip2cli.train.recipe import PretrainRecipe

    if full:
        overrides = ["model.vision=eva-g", "model.image_size=224", "model.qformer.hidden_size=768",
                     "model.qformer.num_layers=12", "model.qformer.num_heads=12",
                     "model.qformer.intermediate_size=3072", "model.qformer.num_query_tokens=32",
                     "model.frozen_dtype=bfloat16"]
    else:
        overrides = ["model.image_size=224", "model.qformer.hidden_size=384", "model.qformer.num_layers=6",
                     "model.qformer.num_heads=6", "model.qformer.intermediate_size=1536",
                     "model.qformer.num_query_tokens=32", "model.qformer.max_position_embeddings=64",
                     "stage1.max_txt_len=32"]
    recipe = load_recipe(PretrainRecipe, "tiny/stage1", overrides)
    if not full:
        recipe.model.vision = VisionConfig(kind="eva", image_size=224, patch_size=16, width=384, layers=12, heads=6,
                                           mlp_dim=1536)
    torch.manual_seed(0)
    task, _ = build_stage1(recipe)
    assert qformer_tokenizer  # the tiny word-level tokenizer: texts of the shapes dataset
    return task, recipe


def batch(n: int, image_size: int = 224):
    import torch

    from blip2cli.data.synthetic import COLOURS, SHAPES, caption

    g = torch.Generator().manual_seed(0)
    texts = [f"question what colour is this photo {caption(COLOURS[i % 4], SHAPES[i % 3])}" for i in range(n)]
    return {"image": torch.randn(n, 3, image_size, image_size, generator=g), "text": texts}


def worker(args) -> None:
    import torch

    from blip2cli.runtime import dist
    from blip2cli.train.engine import DeepSpeedEngine, TorchEngine
    from blip2cli.runtime.dist import init_distributed

    device = init_distributed()
    task, recipe = make_task(args.full)
    recipe.train.zero_stage = args.zero
    recipe.train.precision = "bf16" if args.full else "fp32"
    world = dist.world_size()
    recipe.data.batch_size = args.batch // world
    engine = (DeepSpeedEngine if args.zero >= 0 and world > 1 else TorchEngine)(task, recipe, device)
    data = batch(args.batch)
    rank = dist.rank()
    part = {k: v[rank * recipe.data.batch_size:(rank + 1) * recipe.data.batch_size] for k, v in data.items()}
    part["image"] = part["image"].to(engine.device)
    engine.train_batch([part], 0, 1e-4)  # warm-up
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        engine.train_batch([part], step, 1e-4)
    sync()
    elapsed = time.perf_counter() - start
    peaks = dist.gather_no_grad(torch.tensor([peak_rss_mib()]))
    if rank == 0:
        Path(args.result).write_text(json.dumps({"samples_per_s": args.batch * args.steps / elapsed,
                                                 "peak_rss_mib_per_rank": peaks.tolist()}))
    if world > 1:
        torch.distributed.barrier()
        os._exit(0)


def launch(zero: int, args, result: Path) -> dict:
    """One run of one side: the plain process, or a DeepSpeed launch of two ranks with ZeRO stage ``zero``."""
    result.unlink(missing_ok=True)
    worker_args = ["--worker", "--zero", str(zero), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--result", str(result)] + (["--full"] if args.full else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if zero < 0:
        cmd = [sys.executable, "-m", "benchmarks.train_step", *worker_args]
    else:
        env.update(OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
        if not args.device.startswith("cuda"):
            env["DS_ACCELERATOR"] = "cpu"
        deepspeed = str(Path(sys.executable).with_name("deepspeed"))
        cmd = [deepspeed, "--num_accelerators" if env.get("DS_ACCELERATOR") else "--num_gpus", "2", "--module",
               "benchmarks.train_step", *worker_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run with zero={zero} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    add_rounds_argument(parser)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        def side(name: str, zero: int) -> Callable[[int], dict]:
            return lambda r: launch(zero, args, Path(tmp) / f"{name}.json")

        rounds = alternate({name: side(name, zero) for name, zero in (("plain", -1), ("zero2", 2), ("zero3", 3))},
                           args.rounds)
    report = {"config": "full (EVA ViT-g, BERT-base Q-Former)" if args.full else "mid", "global_batch": args.batch,
              "rounds": args.rounds, **rounds.timing("samples_per_s"), **rounds.peaks("peak_rss_mib_per_rank"),
              **{f"{name}_over_plain_best_rounds": round(rounds.ratio(name, "plain", "samples_per_s"), 3)
                 for name in ("zero2", "zero3")}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
