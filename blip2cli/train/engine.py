"""One training engine interface (``Engine``) over a plain PyTorch process and DeepSpeed ZeRO, driving a
``Task``: the loop sees only these two protocols."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..runtime import dist
from ..runtime.devices import autocast_dtype
from ..integrity import weights_only_load
from .recipe import PretrainRecipe, deepspeed_config
from .schedule import param_groups


class Task(Protocol):
    """A trainable objective around a BLIP-2 network (``Stage1Task``, ``Stage2Task``): an ``nn.Module`` whose
    forward takes a collated batch and the step, and returns the losses, ``loss`` (the one to minimise)
    among them."""

    net: nn.Module

    def __call__(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]: ...
    # and, beside the losses, ``tokens``: the text tokens the batch fed the model (for tokens/s)


class Engine(Protocol):
    """What the training loop needs from an engine (``TorchEngine``, ``DeepSpeedEngine``)."""

    kind: str  # recorded in trainer state: a resume must use the same engine
    device: torch.device

    @property
    def module(self) -> nn.Module:
        """The task as the engine wraps it (for evaluation-mode calls and the state of the data)."""

    def train_batch(self, batches: list[dict[str, Any]], step: int, lr: float) -> dict[str, float]:
        """The micro-batches of one optimiser step (forward, backward, accumulation, clipping, update) at
        learning rate ``lr``; the mean of each loss, the gradients' norm before clipping (``grad_norm``) and the
        text tokens of this rank's batches (``tokens``)."""

    def model_state(self) -> dict[str, torch.Tensor]:
        """The network's full weights for a model checkpoint (a collective under ZeRO-3: all ranks call it)."""

    def save(self, path: Path) -> None:
        """Write the complete trainer state (weights being trained, optimiser, scaler) under ``path``."""

    def load(self, path: Path) -> None:
        """Read back what ``save`` wrote."""


def _optimizer(task: nn.Module, recipe: PretrainRecipe) -> torch.optim.Optimizer:
    o = recipe.optim
    groups = param_groups(task, o.weight_decay, o.decay_temp_and_queries, o.vision_layer_decay or 1.0)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def _mean(outs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Each loss averaged over the micro-batches, their ``tokens`` summed."""
    return {k: sum(float(o[k].detach()) for o in outs) / (1 if k == "tokens" else len(outs)) for k in outs[0]}


class TorchEngine:
    """A single process: torch AdamW, autocast, gradient accumulation and clipping."""

    def __init__(self, task: nn.Module, recipe: PretrainRecipe, device: torch.device) -> None:
        self.task = task.to(device)
        self.device = device
        self.recipe = recipe
        self.optimizer = _optimizer(task, recipe)
        self.dtype = autocast_dtype(recipe.train.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=recipe.train.precision == "fp16")
        self.kind = "torch"

    @property
    def module(self) -> nn.Module:
        return self.task

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_batch(self, batches: list[dict[str, Any]], step: int, lr: float) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.task.train()
        self.optimizer.zero_grad(set_to_none=True)
        outs = []
        for batch in batches:
            with self._autocast():
                out = self.task(batch, step)
            self.scaler.scale(out["loss"] / len(batches)).backward()
            outs.append(out)
        self.scaler.unscale_(self.optimizer)
        trainable = self._trainable()
        norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
        if self.recipe.train.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(trainable, self.recipe.train.grad_clip, norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {**_mean(outs), "grad_norm": float(norm)}

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.task.parameters() if p.requires_grad]

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.task.net.state_dict()

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach() for n, p in self.task.named_parameters() if p.requires_grad}
        torch.save({"trainable": trainable, "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict()}, path / "engine.pt")

    def load(self, path: Path) -> None:
        state = weights_only_load(path / "engine.pt", map_location=self.device)
        missing, unexpected = self.task.load_state_dict(state["trainable"], strict=False)
        if unexpected:
            raise RuntimeError(f"resume: unexpected keys {unexpected[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


class DeepSpeedEngine:
    """DeepSpeed ZeRO (stage from the recipe) over the same task, with a torch AdamW as its optimiser."""

    def __init__(self, task: nn.Module, recipe: PretrainRecipe, device: torch.device) -> None:
        deepspeed = dist.import_deepspeed()
        self.recipe = recipe
        config = deepspeed_config(recipe, dist.world_size())
        config.setdefault("zero_allow_untested_optimizer", True)
        trainable = [p for p in task.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=task, optimizer=_optimizer(task, recipe), model_parameters=trainable, config=config)
        self.device = self.engine.device
        self.kind = f"deepspeed-zero{recipe.train.zero_stage}"
        self.save_error: str | None = None
        self._guard_checkpoint_files()
        if recipe.train.zero_stage == 3:
            for p in task.net.external_parameters():
                deepspeed.zero.register_external_parameter(self.engine.module, p)

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def train_batch(self, batches: list[dict[str, Any]], step: int, lr: float) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.engine.train()
        outs = []
        for batch in batches:
            out = self.engine(batch, step)
            self.engine.backward(out["loss"])
            self.engine.step()
            outs.append(out)
        norm = self.engine.get_global_grad_norm()
        return {**_mean(outs), **({"grad_norm": float(norm)} if norm is not None else {})}

    def model_state(self) -> dict[str, torch.Tensor]:
        """Full weights, gathered from the ZeRO-3 partitions where needed (a collective: all ranks call it)."""
        net = self.engine.module.net
        if self.recipe.train.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None):
                return {k: v.detach().clone() for k, v in net.state_dict().items()}
        return net.state_dict()

    def _guard_checkpoint_files(self) -> None:
        """DeepSpeed reads its checkpoint files weights-only, and a failed write (a full disk) is recorded
        instead of raised midway, so that this rank still joins the collectives that end the save."""
        files = self.engine.checkpoint_engine
        write = files.save

        def save(state_dict: Any, path: str) -> None:
            if self.save_error is not None:
                return
            try:
                write(state_dict, path)
            except Exception as e:
                self.save_error = f"{path}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
                with contextlib.suppress(OSError):
                    os.unlink(path)

        files.save = save
        files.load = weights_only_load

    def save(self, path: Path) -> None:
        self.save_error = None
        self.engine.save_checkpoint(str(path), tag="engine", save_latest=False)
        if self.save_error is not None:
            raise OSError(self.save_error)

    def load(self, path: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(str(path), tag="engine", load_module_strict=False)
        if loaded is None:
            raise RuntimeError(f"resume: no DeepSpeed checkpoint in {path}")


def make_engine(task: Task, recipe: PretrainRecipe, device: torch.device) -> Engine:
    """The recipe's engine (``auto``: DeepSpeed under a launcher, torch in a plain process)."""
    kind = recipe.train.engine
    if kind == "auto":
        kind = "deepspeed" if dist.world_size() > 1 else "torch"
    return DeepSpeedEngine(task, recipe, device) if kind == "deepspeed" else TorchEngine(task, recipe, device)
