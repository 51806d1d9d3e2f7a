"""Caption fine-tune step throughput and memory: the ViT trained, frozen, trained with gradient checkpointing, and
trained under DeepSpeed ZeRO-2 on two ranks.

The step is the one ``blip2 finetune caption`` runs: the recipe loader (``tiny/caption``, or for ``--full`` the
paper's ``finetune/caption_coco_opt-2.7b``) with ``--set``-style overrides, ``build_caption`` from an ``--init``
stage-2 checkpoint, ``make_engine`` with the real parameter groups (ViT layer-wise LR decay from the recipe: 0.95
in ``tiny/caption``, none in the COCO recipe) and ``Engine.train_batch``. ``build_caption`` only starts from a
saved stage-2 model, so a random one is built first, once, in a temporary directory, with the calls a stage-2 run
makes (``Blip2ImageToText`` around a random OPT from ``build_language_model``, its tower and LLM frozen) and saved
by the package's own ``formats.native.save``; every run then loads it through ``build_caption``, its ViT positions
resampled from the checkpoint's image size to the fine-tune's, as a real fine-tune does.

Sizes: ``mid`` (default): a 12-layer 384-wide ViT (patch 16, 192 px checkpoint, fine-tuned at 224 px), the
6-layer 384-wide Q-Former of ``train_step.py`` (32 queries), a random 4-layer 512-wide OPT (vocabulary 50272),
float32 throughout; ``--tiny``: a few-second smoke run of the same path. A fixed synthetic batch of images and
12-word captions after the prompt "a photo of". Sides, alternating over ``--rounds`` rounds, each run a fresh
process: ``trained`` (the ViT trained, float32 master weights), ``frozen`` (the ViT frozen), ``checkpointing``
(trained, its blocks recomputed in backward), ``zero2x2`` (trained, DeepSpeed ZeRO-2 on two ranks with half the
batch each, gloo on CPU). The single-process sides use ``--cores`` threads (default: every usable core), each ZeRO
rank half as many; on a machine busy with other work, threads wait on each other and the spread shows it. Prints
each side's best round in samples/s with the spread across rounds, peak memory per rank (the largest over rounds;
CPU: the resident high-water mark from the end of the build to the end of the steps, so the weights but not the
checkpoint load; GPU: ``torch.cuda.max_memory_allocated`` over the same span) and the ratios trained/frozen,
checkpointing/trained and ZeRO-2x2/one process.

    python -m benchmarks.finetune_step [--batch 4] [--steps 2] [--rounds 3] [--sides trained frozen ...] [--cores 2]
    python -m benchmarks.finetune_step --tiny --rounds 1          # smoke run
    python -m benchmarks.finetune_step --full --device cuda [--batch 16] [--find-max-batch]

``--full`` (one GPU): the paper's architecture with random weights (EVA ViT-g from ``TOWERS['eva-g']``, a
BERT-base Q-Former, the OPT-2.7B architecture) with the LLM frozen in bf16 and bf16 autocast, the 224 px checkpoint
fine-tuned at 364 px; sides ``trained`` and ``checkpointing``. ``--find-max-batch`` (CUDA) then doubles the batch
from 1 in one fresh process per side until it runs out of memory and reports the largest batch that fits.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._memory import peak_rss_mib
from benchmarks._rounds import Rounds, add_rounds_argument, alternate, spawn

ROOT = Path(__file__).resolve().parents[1]  # on the workers' PYTHONPATH, for ``-m benchmarks.finetune_step``
PROMPT = "a photo of"


@dataclass(frozen=True)
class Size:
    """The random stage-2 model (tower, Q-Former, OPT) and the recipe it is fine-tuned with."""

    vision: dict[str, Any]  # VisionConfig fields, at the checkpoint's image size
    qformer: dict[str, Any]  # QFormerConfig fields
    llm: dict[str, Any]  # OPTConfig fields; vocab_size None: the tokenizer's
    image_size: int  # fine-tuned at
    recipe: str
    overrides: tuple[str, ...]
    batch: int
    steps: int
    sides: tuple[str, ...]


MID_OPT = {"hidden_size": 512, "word_embed_proj_dim": 512, "ffn_dim": 2048, "num_hidden_layers": 4,
           "num_attention_heads": 8, "max_position_embeddings": 128, "vocab_size": 50272}
# facebook/opt-2.7b's config.json
OPT_2_7B = {"hidden_size": 2560, "word_embed_proj_dim": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
            "num_attention_heads": 32, "max_position_embeddings": 2048, "vocab_size": 50272,
            "do_layer_norm_before": True, "activation_function": "relu", "dropout": 0.1, "attention_dropout": 0.0,
            "enable_bias": True}
CPU_SIDES = ("trained", "frozen", "checkpointing", "zero2x2")
SIZES = {
    "tiny": Size(vision={"kind": "eva", "image_size": 48, "patch_size": 16, "width": 64, "layers": 2, "heads": 2,
                         "mlp_dim": 128},
                 qformer={"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128,
                          "num_query_tokens": 8},
                 llm={"hidden_size": 64, "word_embed_proj_dim": 64, "ffn_dim": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "max_position_embeddings": 64, "vocab_size": None},
                 image_size=64, recipe="tiny/caption", overrides=(), batch=4, steps=2, sides=CPU_SIDES),
    "mid": Size(vision={"kind": "eva", "image_size": 192, "patch_size": 16, "width": 384, "layers": 12, "heads": 6,
                        "mlp_dim": 1536},
                qformer={"hidden_size": 384, "num_layers": 6, "num_heads": 6, "intermediate_size": 1536,
                         "num_query_tokens": 32},
                llm=MID_OPT, image_size=224, recipe="tiny/caption", overrides=(), batch=4, steps=2, sides=CPU_SIDES),
    "full": Size(vision={"name": "eva-g", "image_size": 224}, qformer={}, llm=OPT_2_7B, image_size=364,
                 recipe="finetune/caption_coco_opt-2.7b",
                 overrides=("model.frozen_dtype=bfloat16", "train.precision=bf16", "train.global_batch=null"),
                 batch=16, steps=5, sides=("trained", "checkpointing")),
}


@dataclass(frozen=True)
class Side:
    overrides: tuple[str, ...]
    ranks: int = 1


SIDES = {
    "trained": Side(("model.train_vision=true", "model.vision_grad_checkpointing=false")),
    "frozen": Side(("model.train_vision=false", "model.vision_grad_checkpointing=false")),
    "checkpointing": Side(("model.train_vision=true", "model.vision_grad_checkpointing=true")),
    "zero2x2": Side(("model.train_vision=true", "model.vision_grad_checkpointing=false", "train.engine=deepspeed",
                     "train.zero_stage=2"), ranks=2),
}
# (report name, side, against)
RATIOS = (("trained_over_frozen", "trained", "frozen"), ("checkpointing_over_trained", "checkpointing", "trained"),
          ("zero2x2_over_one_process", "zero2x2", "trained"))


def size_of(args: argparse.Namespace) -> str:
    return "full" if args.full else "tiny" if args.tiny else "mid"


def vision_config(size: Size):
    from dataclasses import replace

    from blip2cli.models.components import TOWERS
    from blip2cli.models.vision import VisionConfig

    v = dict(size.vision)
    return replace(TOWERS[v.pop("name")], **v) if "name" in v else VisionConfig(**v)


def stage2_config(size_name: str):
    """The random stage-2 model's config (its LLM an OPT) and the LLM tokenizer it is saved with."""
    from transformers import OPTConfig

    from blip2cli.models import tiny
    from blip2cli.models.blip2 import Blip2Config
    from blip2cli.models.qformer import QFormerConfig

    size = SIZES[size_name]
    tok = tiny.llm_tokenizer()  # word-level, OPT's special tokens; a caption ends at its newline
    llm = {**size.llm, "vocab_size": size.llm["vocab_size"] or len(tok)}
    text = OPTConfig(**llm, bos_token_id=2, pad_token_id=1, eos_token_id=tok.convert_tokens_to_ids("\n")).to_dict()
    vision = vision_config(size)
    qformer = QFormerConfig(**size.qformer, encoder_width=vision.width, has_text=False, has_lm_head=False)
    return Blip2Config(vision=vision, qformer=qformer, text=text), tok


def make_init(size_name: str, out: str, queue) -> None:
    """Save a random stage-2 checkpoint of ``size_name`` in ``out``, built as ``build_stage2`` builds one."""
    import torch

    from blip2cli.models.assemble import Checkpoint
    from blip2cli.models.blip2 import Blip2ImageToText
    from blip2cli.models.formats.native import save
    from blip2cli.models.llm import build_language_model
    from blip2cli.runtime.devices import dtype_of
    from blip2cli.train.build import freeze

    cfg, tok = stage2_config(size_name)
    frozen = dtype_of("bfloat16" if size_name == "full" else "float32")
    torch.manual_seed(0)
    net = Blip2ImageToText(cfg, language_model=build_language_model(cfg.text, dtype=frozen))
    freeze(net.frozen_modules(), frozen)
    save(Checkpoint(net, cfg, tok, None, "caption", "stage2", {}), Path(out))
    queue.put({"params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 1)})


def batch(n: int, image_size: int) -> dict[str, Any]:
    import torch

    from blip2cli.data.synthetic import COLOURS, SHAPES, caption

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(caption(COLOURS[(i + j) % 4], SHAPES[(i + j) % 3]) for j in range(4)) for i in range(n)]
    return {"image": torch.randn(n, 3, image_size, image_size, generator=g), "text": texts}


def recipe_for(size_name: str, side: str, per_rank_batch: int):
    from blip2cli.config import load_recipe
    from blip2cli.train.recipe import PretrainRecipe

    size = SIZES[size_name]
    overrides = [f"model.image_size={size.image_size}", f"stage2.prompt={PROMPT}", *size.overrides,
                 *SIDES[side].overrides, f"data.batch_size={per_rank_batch}"]
    return load_recipe(PretrainRecipe, size.recipe, overrides)


def worker(args: argparse.Namespace) -> None:
    import torch

    from blip2cli.runtime import dist
    from blip2cli.train.build import build_caption
    from blip2cli.train.engine import make_engine

    device = dist.init_distributed()
    world, rank = dist.world_size(), dist.rank()
    size_name = size_of(args)
    size = SIZES[size_name]
    recipe = recipe_for(size_name, args.side, args.batch // world)
    task, _ = build_caption(recipe, args.init)
    engine = make_engine(task, recipe, device)
    cuda = engine.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def reset_peaks() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS

    def steps(data: dict[str, Any], n: int) -> tuple[float, float]:
        """Warm-up, then ``n`` timed steps: seconds and the last loss."""
        engine.train_batch([data], 0, 1e-5)
        sync()
        start = time.perf_counter()
        for step in range(1, n + 1):
            loss = engine.train_batch([data], step, 1e-5)["loss"]
        sync()
        return time.perf_counter() - start, loss

    def part(n: int) -> dict[str, Any]:
        data = batch(n, size.image_size)
        per = n // world
        out = {k: v[rank * per:(rank + 1) * per] for k, v in data.items()}
        return {**out, "image": out["image"].to(engine.device)}

    if args.find_max_batch:
        Path(args.result).write_text(json.dumps(find_max_batch(steps, part, reset_peaks)))
        return
    reset_peaks()
    elapsed, loss = steps(part(args.batch), args.steps)
    memory = [peak_rss_mib()] + ([torch.cuda.max_memory_allocated() / 2**20] if cuda else [])
    peaks = dist.gather_no_grad(torch.tensor([memory], dtype=torch.float64, device=engine.device)).cpu()
    if rank == 0:
        result = {"samples_per_s": args.batch * args.steps / elapsed, "loss": loss,
                  "peak_rss_mib_per_rank": peaks[:, 0].tolist(),
                  "max_allocated_mib_per_rank": peaks[:, 1].tolist() if cuda else None,
                  "trained_params_m": round(sum(p.numel() for p in task.parameters() if p.requires_grad) / 1e6, 1)}
        Path(args.result).write_text(json.dumps(result))
    if world > 1:
        torch.distributed.barrier()
        os._exit(0)


def find_max_batch(steps: Callable, part: Callable, reset_peaks: Callable, limit: int = 4096) -> dict[str, Any]:
    """Double the batch from 1 until a step runs out of GPU memory: each batch that fits with its samples/s and
    peak allocation."""
    import torch

    fits: list[dict[str, Any]] = []
    n = 1
    while n <= limit:
        try:
            reset_peaks()
            elapsed, _ = steps(part(n), 1)
        except torch.cuda.OutOfMemoryError:
            break
        fits.append({"batch": n, "samples_per_s": round(n / elapsed, 2),
                     "max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20)})
        n *= 2
    return {"largest_batch": fits[-1]["batch"] if fits else 0, "tried": fits}


def launch(side: str, args: argparse.Namespace, init: Path, result: Path, find_max: bool = False) -> dict:
    """One run of one side in a fresh process: plain, or two ranks under the DeepSpeed launcher."""
    result.unlink(missing_ok=True)
    worker_args = ["--worker", "--side", side, "--init", str(init), "--batch", str(args.batch), "--steps",
                   str(args.steps), "--result", str(result), "--device", args.device]
    worker_args += ["--full"] if args.full else ["--tiny"] if args.tiny else []
    worker_args += ["--find-max-batch"] if find_max else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.cores)}
    if SIDES[side].ranks == 1:
        cmd = [sys.executable, "-m", "benchmarks.finetune_step", *worker_args]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, args.cores // 2))
        if not args.device.startswith("cuda"):
            env["DS_ACCELERATOR"] = "cpu"
        deepspeed = str(Path(sys.executable).with_name("deepspeed"))
        cmd = [deepspeed, "--num_accelerators" if env.get("DS_ACCELERATOR") else "--num_gpus", "2", "--module",
               "benchmarks.finetune_step", *worker_args]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"side {side} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(result.read_text())


def report(args: argparse.Namespace, rounds: Rounds, params_m: float) -> dict[str, Any]:
    size = SIZES[size_of(args)]
    memory = "max_allocated_mib_per_rank" if args.device.startswith("cuda") else "peak_rss_mib_per_rank"
    recipe = recipe_for(size_of(args), "trained", args.batch)
    out: dict[str, Any] = {
        "config": size_of(args), "model_params_m": params_m, "vision": size.vision, "image_size": size.image_size,
        "recipe": size.recipe, "vision_layer_decay": recipe.optim.vision_layer_decay or 1.0,
        "precision": recipe.train.precision, "frozen_dtype": recipe.model.frozen_dtype, "global_batch": args.batch,
        "steps": args.steps, "rounds": args.rounds,
        "trained_params_m": {side: rounds.runs[side][0]["trained_params_m"] for side in rounds.runs},
        "last_loss": {side: round(rounds.runs[side][-1]["loss"], 4) for side in rounds.runs},
        **rounds.timing("samples_per_s"), **rounds.peaks("peak_rss_mib_per_rank")}
    if memory != "peak_rss_mib_per_rank":
        out.update(rounds.peaks(memory))
    for name, side, other in RATIOS:
        if side in rounds.runs and other in rounds.runs:
            out[f"{name}_samples_per_s"] = round(rounds.ratio(side, other, "samples_per_s"), 3)
            out[f"{name}_peak_memory"] = round(max(rounds.peak(side, memory)) / max(rounds.peak(other, memory)), 3)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--full", action="store_true", help="the paper's architecture, random weights (a GPU)")
    which.add_argument("--tiny", action="store_true", help="a few-second smoke run on the CPU")
    parser.add_argument("--batch", type=int, help="global batch (default: mid 4, tiny 4, full 16)")
    parser.add_argument("--steps", type=int, help="timed steps after one warm-up step (default: mid 2, tiny 2, "
                                                  "full 5)")
    parser.add_argument("--sides", nargs="+", choices=tuple(SIDES), help="default: every side of the size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of a one-process side; each ZeRO rank gets half (default: every usable core)")
    parser.add_argument("--find-max-batch", action="store_true",
                        help="then double the batch from 1 until out of GPU memory, per single-process side")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=tuple(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    add_rounds_argument(parser)
    args = parser.parse_args(argv)
    size = SIZES[size_of(args)]
    args.batch = args.batch or size.batch
    args.steps = args.steps or size.steps
    args.sides = args.sides or list(size.sides)
    cuda = args.device.startswith("cuda")
    if min(args.batch, args.steps, args.cores) < 1:
        parser.error("--batch, --steps and --cores must be at least 1")
    if args.full and not cuda:
        parser.error("--full is the paper's architecture: run it on a GPU with --device cuda")
    if args.find_max_batch and not cuda:
        parser.error("--find-max-batch needs --device cuda (it runs until the GPU is out of memory)")
    if args.batch % 2 and any(SIDES[s].ranks == 2 for s in args.sides):
        parser.error(f"--batch {args.batch}: the two-rank side needs an even batch")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "stage2"
        params_m = spawn(make_init, size_of(args), str(init))["params_m"]

        def side(name: str) -> Callable[[int], dict]:
            return lambda r: launch(name, args, init, Path(tmp) / f"{name}.json")

        rounds = alternate({name: side(name) for name in args.sides}, args.rounds)
        out = report(args, rounds, params_m)
        if args.find_max_batch:
            out["find_max_batch"] = {name: launch(name, args, init, Path(tmp) / f"{name}-max.json", find_max=True)
                                     for name in args.sides if SIDES[name].ranks == 1}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
