"""One model's run over one benchmark: its options, its run directory (chosen from what makes the work,
locked, claimed), the recipe's settings and zero-shot protocol, and the model on this rank's device."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runtime.errors import Blip2Error


@dataclass
class RunOptions:
    """How to run a model over a benchmark. Without ``model`` (and without ``zero_shot``, whose protocol names
    one), a benchmark scores a predictions file instead."""

    model: str | None = None  # registry name, hub id or path
    llm: str | None = None  # the LLM of a LAVIS stage-2 .pth
    images: Path | None = None  # the benchmark's image root
    items: Path | None = None  # captioning: the images to caption (default: the references' images)
    recipe: str | None = None  # prompt and decoding (default: eval/<benchmark>)
    overrides: list[str] = field(default_factory=list)  # a.b=c recipe overrides
    out: Path = Path("runs")  # the directory that holds the runs
    name: str | None = None  # the run directory under ``out`` (default: from the benchmark and the model)
    device: str = "auto"
    dtype: str = "auto"
    zero_shot: bool = False  # the paper's protocol from the recipe, for what is not given
    overwrite: bool = False  # discard the run directory's work made otherwise
    paper: str | None = None  # the registry model whose paper figures to compare with (default: the one run)


class ModelRun:
    """The state of one run: what the zero-shot protocol filled in, the notes for the report, the items
    skipped for an unreadable image, and the run directory once ``prepare`` chose it."""

    def __init__(self, options: RunOptions) -> None:
        self.model, self.llm, self.images, self.items = options.model, options.llm, options.images, options.items
        self.recipe, self.overrides = options.recipe, list(options.overrides or [])
        self.out, self.name, self.device, self.dtype = options.out, options.name, options.device, options.dtype
        self.zero_shot, self.overwrite, self.paper = options.zero_shot, options.overwrite, options.paper
        self.images_hint, self.notes, self.skipped = "check --images", [], 0
        self.directory: Path | None = None
        self.label = ""  # the model's name in run names, once ``prepare`` identified it
        self.provenance: dict[str, Any] | None = None
        self.lock = None

    @property
    def runs_model(self) -> bool:
        return self.model is not None

    def run_dir(self, command: str) -> Path:
        """The run directory ``prepare`` chose."""
        if self.directory is None:
            raise RuntimeError(f"eval {command}: the run directory is chosen by prepare()")
        return self.directory

    def prepare(self, command: str, work: str, settings: dict[str, Any], inputs: dict[str, Path | None]) -> Path:
        """Choose the run directory from what makes this run's ``work``, refusing one that holds work made
        otherwise (every rank, before the model loads)."""
        from . import provenance

        label, identity = provenance.identify(self.model, self.llm)
        record = provenance.record(command, identity, self.resolved_dtype(), settings,
                                   {**inputs, "images": self.images})
        directory = self.out / self.name if self.name else provenance.default_dir(self.out, command, label, record)
        self.lock_directory(directory)
        provenance.check(directory, record, work, self.overwrite)
        self.directory, self.provenance, self.label = directory, record, label
        return directory

    def model_summary(self) -> dict[str, str]:
        """The model ``prepare`` identified, as ``results.json`` names it: its label and its source (the real path
        of a local checkpoint or LAVIS file, or the hub id), as ``provenance.json`` records it."""
        return {"label": self.label, "source": self.provenance["made_by"]["model"]["source"]}

    def __enter__(self) -> ModelRun:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def lock_directory(self, directory: Path) -> None:
        """One run per directory: rank 0 holds its lock until the run ends (``with ModelRun(...)``) or the process
        does (a second run stops at once, naming the holder)."""
        from ..runtime.rundir import RunLock

        if int(os.environ.get("RANK", "0")) == 0:  # before the process group exists: the launcher's rank
            self.lock = RunLock(directory).acquire()

    def start(self) -> None:
        """Rank 0 makes the run directory this run's (``--overwrite`` discards, then ``provenance.json`` is
        written) before anything is predicted; the other ranks wait for it."""
        from ..runtime import dist
        from . import provenance

        if dist.rank() == 0:
            provenance.claim(self.directory, self.provenance, self.overwrite)
        if dist.is_distributed():
            import torch

            torch.distributed.barrier()

    def resolved_dtype(self) -> str:
        """The dtype the model will run in (``auto`` resolved for this machine's device)."""
        from ..runtime.devices import resolve_device, resolve_dtype

        return str(resolve_dtype(self.dtype, resolve_device(self.device))).removeprefix("torch.")

    def settings(self, command: str, cls: type | None = None):
        """The benchmark's recipe (prompt, decoding, zero-shot protocol), with ``--set`` overrides."""
        from ..config import load_recipe
        from .generation import GenerationEval

        return load_recipe(cls or GenerationEval, self.recipe or f"eval/{command}", self.overrides)

    def apply_zero_shot(self, command: str, protocol, predicting: bool, files: dict[str, Path | None]
                        ) -> dict[str, Path | None]:
        """With ``--zero-shot``: the protocol's files (when none was given), model and image root."""
        if not self.zero_shot:
            return files
        if not protocol.model:
            raise Blip2Error(f"eval {command}: recipe {self.recipe or f'eval/{command}'} has no zero_shot protocol")
        if all(path is None for path in files.values()):
            files = {option: protocol.file(option) for option in files}
        if predicting:
            self.model = self.model or protocol.model
            if self.images is None:
                self.images, self.images_hint = Path(protocol.images), protocol.image_hint()
        if protocol.note:
            self.notes.append(protocol.note)
        return files

    def load(self):
        """The model, on this rank's GPU when a launcher started several ranks."""
        from ..api import load
        from ..runtime.devices import rank_device

        return load(self.model, device=rank_device(self.device), dtype=self.dtype, llm=self.llm)
