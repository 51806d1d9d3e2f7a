"""Run by tests/train/test_deepspeed.py under the DeepSpeed launcher: one forward/backward of a stage task
with batch B per rank through ``DeepSpeedEngine``; rank 0 saves the losses and the full gradients."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2cli.runtime import dist  # noqa: E402
from blip2cli.train.engine import DeepSpeedEngine  # noqa: E402
from blip2cli.runtime.dist import init_distributed  # noqa: E402
from tests.train.tiny_tasks import B, batch_for, rank_part, recipe_for, task_for  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", required=True)
    parser.add_argument("--zero", type=int, required=True)
    parser.add_argument("--assets", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = init_distributed()
    rank, world = dist.rank(), dist.world_size()
    task = task_for(args.stage, args.assets)
    engine = DeepSpeedEngine(task, recipe_for(args.zero), device)
    part = rank_part(batch_for(args.stage, world * B), rank)
    engine.engine.eval()  # no dropout: comparable with the single-process run
    out = engine.engine(part, 5)
    engine.engine.backward(out["loss"])
    from deepspeed.utils import safe_get_full_grad

    grads = {}
    for name, p in engine.engine.module.named_parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p)  # a collective under ZeRO-3: every rank asks for every parameter
            if g is not None:
                grads[name] = g.detach().clone().float()
    # the losses are means over the batch; the text tokens add up
    losses = {k: dist.sum_all(v.detach().float()) / (1 if k == "tokens" else world) for k, v in out.items()}
    if rank == 0:
        torch.save({"losses": losses, "grads": grads}, os.path.join(args.out, f"zero{args.zero}.pt"))
    torch.distributed.barrier()
    os._exit(0)  # skip interpreter teardown, where gloo's threads can abort a finished process


if __name__ == "__main__":
    main()
