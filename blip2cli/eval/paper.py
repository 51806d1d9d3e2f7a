"""The paper's figures beside a benchmark's scores.

An eval recipe's ``paper`` block holds one table and split of the paper and, for each registry model the paper
reports there, its row: the paper's name for it and its figures as the paper prints them. ``choose`` picks the
row a result is compared with (``--paper``, else the registry model evaluated) and ``PaperRow.compare`` gives the
``paper`` entry of the result, in the units blip2 reports.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import from_dict
from ..runtime.errors import Blip2Error


@dataclass
class PaperModel:
    """One model's row of a table: the paper's name for it and its figures (metric -> value as printed)."""

    row: str = ""
    figures: dict[str, float] = field(default_factory=dict)


@dataclass
class PaperFigures:
    """``paper`` in ``recipes/eval/<benchmark>.yaml``: the table and split the figures come from, a note on how
    they compare (another split than the one scored), and the row of each registry model (its name as key)."""

    table: str = ""
    split: str = ""
    note: str | None = None
    models: dict[str, PaperModel] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.models = {name: _model(name, row) for name, row in self.models.items()}


def _model(name: str, row: Any) -> PaperModel:
    """A row as the recipe writes it, checked: a registry BLIP-2 model, its paper name, numeric figures."""
    from ..models import registry

    if isinstance(row, PaperModel):
        return row
    where = f"paper.models.{name}"
    if registry.lookup(name, "blip2") is None:
        close = difflib.get_close_matches(name, [e.name for e in registry.ENTRIES if e.kind == "blip2"], n=1)
        raise Blip2Error(f"{where}: not a BLIP-2 model of the registry" + (f"; did you mean {close[0]}?" if close
                                                                             else ""))
    if not isinstance(row, dict):
        raise Blip2Error(f"{where}: expected a mapping, got {row!r}")
    model = from_dict(PaperModel, row, where)
    if not model.row or not model.figures:
        raise Blip2Error(f"{where}: needs row (the paper's name for the model) and figures")
    for metric, value in model.figures.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Blip2Error(f"{where}.figures.{metric}: expected a number, got {value!r}")
    return PaperModel(model.row, {metric: float(value) for metric, value in model.figures.items()})


@dataclass
class PaperRow:
    """The paper's row a result is compared with; ``figures`` in the units blip2 reports."""

    table: str
    split: str
    note: str | None
    model: str  # the registry name
    row: str  # the paper's name for it
    figures: dict[str, float]

    def compare(self, result: dict[str, Any]) -> dict[str, Any]:
        """The result's ``paper`` entry: the row, its figures, and ours minus each figure the result has."""
        ours = {key: metric(result, key) for key in self.figures}
        difference = {key: round(value - self.figures[key], 6) for key, value in ours.items() if value is not None}
        entry = {"table": self.table, "split": self.split, "model": self.model, "row": self.row,
                 "figures": self.figures, "difference": difference}
        return {**entry, "note": self.note} if self.note else entry


def metric(result: dict[str, Any], key: str) -> float | None:
    """A score of a result: ``CIDEr``, or a subset's as ``in-domain/CIDEr``; None where it has none."""
    subset, _, name = key.rpartition("/")
    scores = result.get("subsets", {}).get(subset, {}) if subset else result
    value = scores.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def registry_name(model: str) -> str | None:
    """The registry model ``model`` (a name, hub id or path) designates; None for a local path or another id."""
    from ..models import registry

    path = Path(model).expanduser()
    if path.exists() or path.is_symlink():
        return None
    entry = registry.lookup(model, "blip2") or registry.by_repo(model)
    return entry.name if entry is not None else None


def choose(figures: PaperFigures, chosen: str | None, model: str | None, benchmark: str,
           printed_per_unit: float = 1.0) -> PaperRow | None:
    """The row to compare with: ``chosen`` (``--paper``; a name the recipe has no row for is an error listing
    those it has), else the row of the registry model that ``model`` designates, if any. The paper prints
    ``printed_per_unit`` times what blip2 reports (100 for the captioning metrics)."""
    if chosen is not None and chosen not in figures.models:
        known = ", ".join(figures.models) or "none (its recipe has no paper figures)"
        raise Blip2Error(f"--paper {chosen}: the paper has no {benchmark} figures for it; choose {known}")
    name = chosen or (registry_name(model) if model else None)
    if name not in figures.models:
        return None
    row = figures.models[name]
    return PaperRow(figures.table, figures.split, figures.note, name, row.row,
                    {key: value / printed_per_unit for key, value in row.figures.items()})
