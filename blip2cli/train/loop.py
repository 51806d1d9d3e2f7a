"""The pretraining loop shared by both stages: data, steps, logging, verified checkpoints, resume, signals."""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runtime.errors import Blip2Error, Interrupted
from ..data.datasets import CaptionJsonDataset, Mixture, VqaJsonDataset, collate, webdataset_samples
from ..data.synthetic import ShapesDataset, ShapesQADataset
from ..data.transforms import train_transform
from ..models.assemble import Checkpoint
from ..models.formats.native import write_model
from .. import integrity
from ..runtime import devices, dist, rundir
from ..runtime.progress import TrainProgress
from . import state
from .engine import Engine, Task, make_engine
from .loggers import RunLoggers
from .recipe import PretrainRecipe
from .schedule import lr_at


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_data(recipe: PretrainRecipe, rank: int, world: int):
    """The rank's infinite, resumable sample stream (a ``Mixture``) and a DataLoader over it."""
    d = recipe.data
    transform = train_transform(recipe.model.image_size, d.min_scale)
    seed = recipe.train.seed
    sources = []
    for s in d.sources:
        if s.kind == "shapes":
            sources.append(ShapesDataset("train", size=s.size, image_size=max(64, recipe.model.image_size),
                                         seed=seed, transform=transform))
        elif s.kind == "shapes_qa":
            sources.append(ShapesQADataset("train", size=s.size, image_size=max(64, recipe.model.image_size),
                                           seed=seed, transform=transform))
        elif s.kind == "caption_json":
            sources.append(CaptionJsonDataset(s.path, s.image_root, transform, max_words=d.max_words, seed=seed))
        elif s.kind == "vqa_json":
            sources.append(VqaJsonDataset(s.path, s.image_root, transform, max_words=d.max_words))
        else:
            sources.append(webdataset_samples(s.path, transform, seed=seed, rank=rank, world_size=world,
                                              max_words=d.max_words, shuffle=d.shuffle_buffer))
    weights = [s.weight for s in d.sources]
    if d.shares == "size":
        weights = [float(n) for n in source_sizes(recipe, sources, "data.shares size", "give weights instead")]
    mixture = Mixture(sources, weights, seed=seed + 7919 * rank, block_size=d.batch_size)
    return mixture


def source_sizes(recipe: PretrainRecipe, sources: list, setting: str, instead: str) -> list[int]:
    """The samples of each built source (annotation files, shapes); ``setting``, which needs them, is refused in one
    line (ending ``instead``) for a source whose size is not known before it is read (webdataset shards)."""
    for spec, source in zip(recipe.data.sources, sources):
        if not hasattr(source, "__len__"):
            raise Blip2Error(f"{setting}: the size of {spec.path} ({spec.kind}) is not known before it is read; "
                             f"{instead}")
    return [len(source) for source in sources]


def run_length(recipe: PretrainRecipe, sources: list, world: int) -> int:
    """The run's optimiser steps: ``train.steps``, or ``train.epochs`` passes over the samples its ``sources`` (the
    built datasets, in the recipe's order) hold together, at ``batch_size x grad_accum x world`` samples a step (the
    last step completing the last pass)."""
    t, d = recipe.train, recipe.data
    if t.steps is not None:
        return t.steps
    samples = sum(source_sizes(recipe, sources, "train.epochs", "give train.steps instead"))
    return max(1, math.ceil(t.epochs * samples / (d.batch_size * t.grad_accum * world)))


def _loader(mixture, recipe: PretrainRecipe):
    from torch.utils.data import DataLoader


    d = recipe.data
    return iter(DataLoader(mixture, batch_size=d.batch_size, num_workers=d.num_workers, collate_fn=collate,
                           persistent_workers=False))


class Stopper:
    """SIGTERM (and SIGINT) ask for a checkpoint at the end of the current step; the previous handlers
    come back when the block ends."""
    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Stopper:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def _agree(stop: bool, error: str | None) -> tuple[bool, str | None]:
    """Every rank's view of (some rank was asked to stop, rank 0's error): one collective per step."""
    if not dist.is_distributed():
        return stop, error
    flags = dist.sum_all(torch.tensor([float(stop), float(error is not None)]))
    return bool(flags[0] > 0), dist.broadcast_text(error) if flags[1] > 0 else None


@dataclass
class Start:
    """Where a run starts: its directory, the checkpoint it continues (None: step 0) and its lock (rank 0)."""
    run: Path
    checkpoint: Path | None
    lock: rundir.RunLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def prepare(run_dir: Path, resume: str, overwrite: bool = False) -> Start:
    """Lock the run directory and choose the checkpoint to continue, before anything is built.

    Rank 0 decides (it alone holds the lock) and every rank gets its answer, or its error.
    """
    lock, chosen, failure = None, None, None
    if dist.rank() == 0:
        try:
            lock = rundir.RunLock(run_dir).acquire()
            chosen = choose_checkpoint(run_dir, resume, overwrite)
        except Exception as e:
            failure = e
            if lock is not None:
                lock.release()
    message = dist.broadcast_text(None if failure is None else str(failure) or type(failure).__name__)
    if failure is not None:
        raise failure
    if message is not None:
        raise Blip2Error("")  # rank 0 reports it
    where = dist.broadcast_text(None if chosen is None else str(chosen))
    return Start(run_dir, None if where is None else Path(where), lock)


def choose_checkpoint(run: Path, resume: str, overwrite: bool) -> Path | None:
    """The checkpoint ``--resume`` names (rank 0): ``auto``, ``never`` or a directory. See ``prepare``."""
    if overwrite and resume not in ("auto", "never", ""):
        raise Blip2Error(f"--overwrite starts a clean run: it does not go with --resume {resume}")
    if resume in ("never", "") or overwrite:
        if rundir.has_checkpoints(run):
            if not overwrite:
                raise Blip2Error(f"{run} already has checkpoints ({_listing(run)}): --resume never would train over "
                                 "them from step 0; add --overwrite to delete them first, or drop --resume never to "
                                 "continue")
            removed = rundir.clear_run(run)
            print(f"--overwrite: deleted {', '.join(removed)} from {run}", file=sys.stderr)
        return None
    if resume == "auto":
        return _newest_verified(run)
    return _named(Path(resume))


def _listing(run: Path) -> str:
    steps = [p.name for p in rundir.step_dirs(run)]
    return ", ".join(steps[:3] + (["..."] if len(steps) > 3 else [])) or "latest"


def _newest_verified(run: Path) -> Path | None:
    """``latest`` if it verifies; else the newest checkpoint that does, named on stderr; else an error.
    None only where the run has no checkpoint at all."""
    target, problem = rundir.read_latest(run)
    if target is not None:
        try:
            integrity.verify(target)
            return target
        except integrity.CorruptCheckpoint as e:
            problem = f"latest ({target.name}) does not verify: {e}"
    others = [p for p in rundir.step_dirs(run) if target is None or p.resolve() != target.resolve()]
    if problem is None and not others:
        return None
    problem = problem or f"{run / 'latest'} is missing"
    failures = []
    for candidate in others:
        try:
            integrity.verify(candidate)
        except integrity.CorruptCheckpoint as e:
            failures.append(str(e))
            continue
        print(f"warning: {problem}; continuing from {candidate}, the newest checkpoint that verifies",
              file=sys.stderr)
        return candidate
    seen = "; ".join(failures[:2]) + ("; ..." if len(failures) > 2 else "") if failures else "there is none"
    raise Blip2Error(f"{problem}, and no other checkpoint verifies ({seen}): nothing was started; continue from "
                     "one you trust with --resume DIR, or start over with --resume never --overwrite")


def _named(path: Path) -> Path:
    """A checkpoint given as ``--resume DIR``: it must verify (one without a manifest is used, with a warning)."""
    if not path.is_dir():
        raise Blip2Error(f"--resume {path}: no such checkpoint directory")
    if not (path / "trainer").is_dir():
        raise Blip2Error(f"--resume {path}: not a training checkpoint (no trainer/ directory); --resume auto "
                         "continues a run directory")
    if not integrity.verify(path, require_manifest=False):
        print(f"warning: {path} has no {integrity.MANIFEST} (written before checkpoints were verified): "
              "continuing from it unverified", file=sys.stderr)
    return path


def _error_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    first = (str(e).strip().splitlines() or [""])[0]
    return first if isinstance(e, (OSError, Blip2Error)) else f"{type(e).__name__}: {first}"


def _needed_bytes(engine: Engine, ckpt: Checkpoint, model_state: dict[str, torch.Tensor],
                  last: Path | None) -> int:
    """About what one checkpoint takes: the last one's size, or weights plus fp32 AdamW state."""
    size = integrity.checkpoint_size(last) if last is not None else None
    if size:
        return size
    by_reference = tuple(f"{name}." for name in ckpt.frozen_sources)
    weights = sum(v.numel() * v.element_size() for k, v in model_state.items() if not k.startswith(by_reference))
    trained = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    return weights + 12 * trained


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def save_checkpoint(engine: Engine, ckpt: Checkpoint, run: Path, step: int, mixture, consumed: int,
                    recipe: PretrainRecipe, last: Path | None = None) -> Path:
    """``step-NNNNNN/`` with a loadable model (rank 0), the full trainer state and, written last, its
    manifest; renamed into place, then ``latest``. A failed save removes its partial directory and raises."""
    rank = dist.rank()
    partial = rundir.partial_dir(run, step)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    if dist.is_distributed():
        torch.distributed.barrier()
    error = None
    try:
        engine.save(partial / "trainer")
        mixture.position = consumed
        state.write(partial / "trainer", rank, {"step": step, "data": mixture.state_dict(), "rng": state.rng_state(),
                                                "engine": engine.kind, "world_size": dist.world_size()})
    except Exception as e:
        error = _error_line(e)
    model_state = engine.model_state()  # a collective under ZeRO-3
    if rank == 0 and error is None:
        try:
            write_model(ckpt, partial, extra={"step": step, "stage": recipe.stage}, state=model_state)
        except Exception as e:
            error = _error_line(e)
    error = dist.first_error(error)
    final = rundir.step_dir(run, step)
    if rank == 0 and error is None:
        try:
            integrity.write_manifest(partial, step)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            rundir.point_latest(run, final)
        except Exception as e:
            error = _error_line(e)
    error = dist.first_error(error)
    if error is not None:
        message = ""
        if rank == 0:
            need = _needed_bytes(engine, ckpt, model_state, last)
            shutil.rmtree(partial, ignore_errors=True)
            free = shutil.disk_usage(run).free
            kept = f"{last} is intact" if last is not None else "there is no earlier checkpoint"
            message = (f"saving the checkpoint of step {step} failed ({error}); a checkpoint needs about {_gb(need)} "
                       f"in {run}, which has {_gb(free)} free; the partial checkpoint was removed and {kept}")
        raise Blip2Error(message)
    if rank == 0:
        rundir.prune(run, recipe.train.keep_last)
    if dist.is_distributed():
        torch.distributed.barrier()
    return final


def resume_from(engine: Engine, mixture, checkpoint: Path) -> tuple[int, dict[str, Any]]:
    """Restore the engine and the data position; returns the step and the RNG state to set last."""
    trainer = checkpoint / "trainer"
    error, saved = None, None
    try:
        saved = state.read(trainer, dist.rank())
        if saved is None:
            error = f"{checkpoint}: no trainer state for rank {dist.rank()} (was it written by fewer ranks?)"
        elif saved["engine"] != engine.kind:
            error = (f"{checkpoint} was written by the {saved['engine']} engine; this run uses {engine.kind}: "
                     "resume with the same train.engine and train.zero_stage")
    except Blip2Error as e:
        error = str(e)
    error = dist.first_error(error)
    if error is not None:
        raise Blip2Error(error if dist.rank() == 0 else "")
    engine.load(trainer)
    mixture.load_state_dict(saved["data"])
    return int(saved["step"]), saved["rng"]


def run(recipe: PretrainRecipe, task: Task, ckpt: Checkpoint, start: Start, device: torch.device) -> Path | None:
    """Train ``task`` for ``recipe.train.steps`` optimiser steps from ``start`` (see ``prepare``); returns the
    last checkpoint. A signal saves a checkpoint and raises ``Interrupted``; the lock is released either way."""
    try:
        return _train(recipe, task, ckpt, start, device)
    finally:
        start.release()


def _train(recipe: PretrainRecipe, task: Task, ckpt: Checkpoint, start: Start,
           device: torch.device) -> Path | None:

    rank, world = dist.rank(), dist.world_size()
    t, run_dir = recipe.train, start.run
    mixture = build_data(recipe, rank, world)
    t.steps = run_length(recipe, mixture.sources, world)  # recorded in the provenance: epochs as steps
    if rank == 0:
        rundir.clear_partial(run_dir)
        rundir.write_provenance(run_dir, asdict(recipe), rundir.command_line())
    engine = make_engine(task, recipe, device)
    step, rng = 0, None
    if start.checkpoint is not None:
        step, rng = resume_from(engine, mixture, start.checkpoint)
        if rank == 0:
            print(f"resumed from {start.checkpoint} at step {step}", file=sys.stderr)
    loggers = _open_loggers(run_dir, step, start.checkpoint, recipe) if rank == 0 else None
    consumed = mixture.position
    batches = _loader(mixture, recipe)  # (making the loader draws from the RNG: restore it afterwards)
    if rng is not None:
        state.set_rng_state(rng)
    per_step = recipe.data.batch_size * t.grad_accum * world
    last = start.checkpoint
    try:
        with Stopper() as stopper, TrainProgress(t.steps, step, enabled=rank == 0) as progress:
            while step < t.steps:
                started = time.perf_counter()
                lr = lr_at(step, recipe.optim.lr, recipe.optim.min_lr, recipe.optim.warmup_lr,
                           recipe.optim.warmup_steps, t.steps)
                micro = [_to(next(batches), engine.device) for _ in range(t.grad_accum)]
                consumed += recipe.data.batch_size * t.grad_accum
                losses = engine.train_batch(micro, step, lr)
                step += 1
                tokens = losses.pop("tokens", None)
                if tokens is not None and dist.is_distributed():
                    tokens = float(dist.sum_all(torch.tensor([tokens]))[0])
                seconds = time.perf_counter() - started
                record = {"step": step, "lr": lr, **losses, "samples_per_s": per_step / seconds,
                          **({"tokens_per_s": tokens / seconds} if tokens is not None else {}),
                          **devices.memory_record(engine.device)}
                error = _log(loggers, progress, record, log=step % t.log_every == 0 or step == t.steps)
                stop, error = _agree(stopper.requested, error)
                if error is not None:
                    raise Blip2Error(error if rank == 0 else "")
                if step % t.save_every == 0 or step == t.steps or stop:
                    if loggers is not None:
                        loggers.flush()  # the steps a checkpoint covers are logged before it exists
                    last = save_checkpoint(engine, ckpt, run_dir, step, mixture, consumed, recipe, last)
                if stop and step < t.steps:
                    raise Interrupted(f"stopped at step {step}: checkpoint {last}; rerun the same command to continue"
                                      if rank == 0 else "")
    finally:
        if loggers is not None:
            loggers.close()
    return last


def _open_loggers(run_dir: Path, step: int, checkpoint: Path | None, recipe: PretrainRecipe) -> RunLoggers:
    """Rank 0, continuing from ``step``: set the run's later checkpoints aside, drop later metrics rows, open the
    recipe's loggers."""
    aside = rundir.set_aside_after(run_dir, step, checkpoint)
    if aside is not None:
        moved = ", ".join(sorted(p.name for p in aside.iterdir()))
        print(f"moved {moved} to {aside}: this run continues from step {step} (delete that folder when you no "
              "longer need it)", file=sys.stderr)
    return RunLoggers(run_dir, step, recipe.train.loggers, asdict(recipe))


def _log(loggers: RunLoggers | None, progress, record: dict[str, Any], log: bool) -> str | None:
    """Log ``record`` (rank 0) and show it; returns the error of a failed ``metrics.jsonl`` append."""
    if loggers is None:
        return None
    progress.update(record, log=log)
    try:
        loggers.log(record)
    except Blip2Error as e:
        return str(e)
    return None


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
