"""Where a run's per-step records go (rank 0): ``metrics.jsonl`` always, TensorBoard and Weights & Biases where the
recipe's ``train.loggers`` names them, each through its own library.

A resumed run continues the same TensorBoard and W&B runs: TensorBoard purges the events an interrupted start wrote
after the step the run continues from (``purge_step``), and W&B resumes the run whose id ``wandb.json`` keeps in the
run directory. Every record is ``{"step", "lr", losses..., "grad_norm", "samples_per_s", "tokens_per_s", memory}``;
TensorBoard and W&B get its values as ``train/<key>`` at the record's step, and the resolved recipe as the run's
config.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

import yaml

from ..runtime.errors import Blip2Error
from ..runtime.extras import import_extra, require_extra
from ..runtime.io import atomic_write_text, read_json
from .metrics import MetricsLog

TENSORBOARD_DIR = "tensorboard"
WANDB_FILE = "wandb.json"  # the id of the run's W&B run, so that a resume continues it
WANDB_DIR = "wandb"


class Logger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The values of a record as TensorBoard and W&B show them: ``train/<key>``, the step apart."""
    return {f"train/{k}": float(v) for k, v in record.items() if k != "step"}


class TensorBoardLog:
    """Scalars under ``run/tensorboard``; a start from ``step`` purges what an earlier start wrote after it."""

    def __init__(self, run: Path, step: int, config: dict[str, Any]) -> None:
        require_extra("tensorboard", "train.loggers: tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run / TENSORBOARD_DIR), purge_step=step + 1, flush_secs=30)
        recipe = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("recipe", "".join(f"    {line}\n" for line in recipe.splitlines()), global_step=step)

    def log(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """One W&B run per run directory (project ``$WANDB_PROJECT``, else ``blip2``; named after the directory),
    resumed by every later start; ``WANDB_MODE=offline`` and the other ``WANDB_*`` settings apply as usual."""

    def __init__(self, run: Path, step: int, config: dict[str, Any]) -> None:
        wandb = import_extra("wandb", "wandb", "train.loggers: wandb")
        ids = run / WANDB_FILE
        run_id = read_json(ids)["id"] if ids.exists() else secrets.token_hex(4)
        if not ids.exists():
            atomic_write_text(ids, json.dumps({"id": run_id}) + "\n")
        (run / WANDB_DIR).mkdir(exist_ok=True)
        try:
            self.run = wandb.init(id=run_id, resume="allow", name=run.name, dir=str(run), config=config,
                                  project=os.environ.get("WANDB_PROJECT") or "blip2",
                                  settings=wandb.Settings(console="off", quiet=True))
        except Exception as e:  # no login, no network, a bad setting: the run has not started yet
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise Blip2Error(f"train.loggers: wandb could not start its run ({first}); log in with `wandb login`, "
                             "or set WANDB_MODE=offline and `wandb sync` the run later") from None
        # a resumed W&B run refuses steps at or before its last one (online: what an interrupted start had sent)
        self.first_new = max(int(getattr(self.run, "step", 0) or 0), step + 1)

    def log(self, record: dict[str, Any]) -> None:
        if record["step"] >= self.first_new:
            self.run.log(scalars(record), step=record["step"])

    def flush(self) -> None:
        pass  # W&B's own process writes as it goes

    def close(self) -> None:
        self.run.finish()


class RunLoggers:
    """``metrics.jsonl`` and the recipe's other loggers, opened on rank 0 for a run continuing from ``step``."""

    def __init__(self, run: Path, step: int, names: list[str], config: dict[str, Any]) -> None:
        self.jsonl = MetricsLog(run, through_step=step)
        self.others: list[Logger] = []
        try:
            if "tensorboard" in names:
                self.others.append(TensorBoardLog(run, step, config))
            if "wandb" in names:
                self.others.append(WandbLog(run, step, config))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict[str, Any]) -> None:
        """``metrics.jsonl`` first (a failed append raises, see ``MetricsLog.append``), then the others."""
        self.jsonl.append(record)
        for logger in self.others:
            logger.log(record)

    def flush(self) -> None:
        """What was logged so far on disk (before each checkpoint: a resume re-logs only the steps after it)."""
        for logger in self.others:
            logger.flush()

    def close(self) -> None:
        self.jsonl.close()
        for logger in self.others:
            logger.close()
