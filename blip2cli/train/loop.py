"""The pretraining loop shared by both stages: data, steps, logging, checkpoints, resume, SIGTERM."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import Blip2Error
from ..models import checkpoints
from . import dist, rundir
from .engine import make_engine
from .recipe import PretrainRecipe
from .schedule import lr_at


def init_distributed(with_deepspeed: bool = True) -> torch.device:
    """Join the process group when launched by DeepSpeed or torchrun; a plain process stays alone.

    Without ``with_deepspeed`` the group is torch's own (no DeepSpeed logging on stdout).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if with_deepspeed:
            dist.import_deepspeed().init_distributed(dist_backend=backend)
        else:
            torch.distributed.init_process_group(backend, init_method="env://")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_data(recipe: PretrainRecipe, rank: int, world: int):
    """The rank's infinite, resumable sample stream (a ``Mixture``) and a DataLoader over it."""
    from ..data.datasets import CaptionJsonDataset, Mixture, webdataset_samples
    from ..data.synthetic import ShapesDataset
    from ..data.transforms import train_transform

    d = recipe.data
    transform = train_transform(recipe.model.image_size, d.min_scale)
    seed = recipe.train.seed
    sources = []
    for s in d.sources:
        if s.kind == "shapes":
            sources.append(ShapesDataset("train", size=s.size, image_size=max(64, recipe.model.image_size),
                                         seed=seed, transform=transform))
        elif s.kind == "caption_json":
            sources.append(CaptionJsonDataset(s.path, s.image_root, transform, max_words=d.max_words, seed=seed))
        else:
            sources.append(webdataset_samples(s.path, transform, seed=seed, rank=rank, world_size=world,
                                              max_words=d.max_words))
    mixture = Mixture(sources, [s.weight for s in d.sources], seed=seed + 7919 * rank, block_size=d.batch_size)
    return mixture


def _loader(mixture, recipe: PretrainRecipe):
    from torch.utils.data import DataLoader

    from ..data.datasets import collate

    d = recipe.data
    return iter(DataLoader(mixture, batch_size=d.batch_size, num_workers=d.num_workers, collate_fn=collate,
                           persistent_workers=False))


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class Stopper:
    """SIGTERM (and SIGINT) ask for a checkpoint at the end of the current step; every rank agrees."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self) -> bool:
        flag = torch.tensor(float(self.requested))
        return bool(dist.sum_all(flag) > 0) if dist.is_distributed() else self.requested


def save_checkpoint(engine, ckpt: checkpoints.Checkpoint, run: Path, step: int, mixture, consumed: int,
                    recipe: PretrainRecipe) -> Path:
    """``step-NNNNNN/`` with a loadable model (rank 0) and the full trainer state, then ``latest``."""
    partial = rundir.partial_dir(run, step)
    if dist.rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    if dist.is_distributed():
        torch.distributed.barrier()
    engine.save(partial / "trainer")
    mixture.position = consumed
    torch.save({"step": step, "data": mixture.state_dict(), "rng": _rng_state(), "engine": engine.kind,
                "world_size": dist.world_size()},
               partial / "trainer" / f"state-rank{dist.rank():03d}.pt")
    model_state = engine.model_state()  # a collective under ZeRO-3
    if dist.rank() == 0:
        checkpoints.write_model(ckpt, partial, extra={"step": step, "stage": recipe.stage}, state=model_state)
    if dist.is_distributed():
        torch.distributed.barrier()
    final = rundir.step_dir(run, step)
    if dist.rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        rundir.point_latest(run, final)
        rundir.prune(run, recipe.train.keep_last)
    if dist.is_distributed():
        torch.distributed.barrier()
    return final


def resume_from(engine, mixture, checkpoint: Path) -> tuple[int, dict[str, Any]]:
    """Restore the engine and the data position; returns the step and the RNG state to set last."""
    state_file = checkpoint / "trainer" / f"state-rank{dist.rank():03d}.pt"
    if not state_file.exists():
        raise Blip2Error(f"{checkpoint}: no trainer state for rank {dist.rank()} (was it written by fewer ranks?)")
    state = torch.load(state_file, weights_only=False)
    if state.get("engine") != engine.kind:
        raise Blip2Error(f"{checkpoint} was written by the {state.get('engine')} engine; this run uses {engine.kind}: "
                         "resume with the same train.engine and train.zero_stage")
    engine.load(checkpoint / "trainer")
    mixture.load_state_dict(state["data"])
    return int(state["step"]), state["rng"]


def run(recipe: PretrainRecipe, task, ckpt: checkpoints.Checkpoint, run_dir: Path, resume: str,
        device: torch.device) -> Path | None:
    """Train ``task`` for ``recipe.train.steps`` optimiser steps; returns the last checkpoint."""
    from .progress import TrainProgress

    rank, world = dist.rank(), dist.world_size()
    t = recipe.train
    if rank == 0:
        rundir.clear_partial(run_dir)
        rundir.write_provenance(run_dir, asdict(recipe), rundir.command_line())
    engine = make_engine(task, recipe, device)
    mixture = build_data(recipe, rank, world)
    step, rng = 0, None
    previous = None
    if resume == "auto":
        previous = rundir.latest(run_dir)
    elif resume not in ("never", ""):
        previous = Path(resume)
        if not previous.is_dir():
            raise Blip2Error(f"--resume {resume}: no such checkpoint directory")
    if previous is not None:
        step, rng = resume_from(engine, mixture, previous)
        print(f"resumed from {previous} at step {step}", file=sys.stderr)
    consumed = mixture.position
    batches = _loader(mixture, recipe)  # (making the loader draws from the RNG: restore it afterwards)
    if rng is not None:
        _set_rng_state(rng)
    stopper = Stopper()
    per_step = recipe.data.batch_size * t.grad_accum * world
    last = previous
    with TrainProgress(t.steps, step, enabled=rank == 0) as progress:
        while step < t.steps:
            started = time.perf_counter()
            lr = lr_at(step, recipe.optim.lr, recipe.optim.min_lr, recipe.optim.warmup_lr, recipe.optim.warmup_steps,
                       t.steps)
            micro = [_to(next(batches), engine.device) for _ in range(t.grad_accum)]
            consumed += recipe.data.batch_size * t.grad_accum
            losses = engine.train_batch(micro, step, lr)
            step += 1
            record = {"step": step, "lr": lr, **losses, "samples_per_s": per_step / (time.perf_counter() - started)}
            if rank == 0:
                rundir.append_metrics(run_dir, record)
                progress.update(record, log=step % t.log_every == 0 or step == t.steps)
            stop = stopper.should_stop()
            if step % t.save_every == 0 or step == t.steps or stop:
                last = save_checkpoint(engine, ckpt, run_dir, step, mixture, consumed, recipe)
            if stop:
                if rank == 0:
                    print(f"stopped at step {step}: checkpoint {last}; continue with --resume auto", file=sys.stderr)
                break
    return last


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
