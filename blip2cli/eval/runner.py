"""Run a model over a benchmark: sharded over ranks, resumable, merged deterministically.

Each rank takes every ``world``-th item, appends its predictions to ``predictions.rank{r}.jsonl`` one
batch at a time (flushed, so a killed run loses at most the batch in flight), and skips on restart the
ids it already has. Rank 0 then merges the files in item order, de-duplicated by id, into
``predictions.json`` in the official results format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.io import atomic_write_text
from ..runtime import dist


@dataclass(frozen=True)
class Item:
    """One benchmark input: its id in the results file, its image, and its text (question) if any."""

    id: Any
    image: Path
    text: str = ""


def _done(path: Path, key: str) -> set:
    """Ids already predicted; a last line cut short by a kill is removed so that appending is safe."""
    if not path.exists():
        return set()
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        path.write_text(text)
    ids = set()
    for line in text.splitlines():
        try:
            ids.add(json.loads(line)[key])
        except (ValueError, KeyError):
            continue  # a line cut short by a kill: its batch is redone
    return ids


def run_sharded(items: Sequence[Item], predict: Callable[[list[Item]], list[str | None]], out: Path, key: str,
                field: str, batch_size: int, progress: Callable[[int], None] = lambda n: None,
                group: Callable[[Item], Any] | None = None) -> list[dict]:
    """Predict every item (this rank's share), then return the merged predictions (on every rank).

    An item ``predict`` answers with None (its image could not be read) is not written: a rerun tries it again.
    ``group``: items with the same key are predicted in the same batches where they fit (the questions of one
    image: its image pass is shared); the predictions file keeps the items' order.
    """
    rank, world = dist.rank(), dist.world_size()
    out.mkdir(parents=True, exist_ok=True)
    mine = list(items)[rank::world]
    shard = out / f"predictions.rank{rank:03d}.jsonl"
    done = _done(shard, key)
    todo = [it for it in mine if it.id not in done]
    if group is not None:
        first: dict[Any, int] = {}
        todo.sort(key=lambda it: first.setdefault(group(it), len(first)))
    progress(len(mine) - len(todo))
    with open(shard, "a") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            texts = predict(batch)
            f.write("".join(json.dumps({key: it.id, field: text}) + "\n" for it, text in zip(batch, texts)
                            if text is not None))
            f.flush()
            os.fsync(f.fileno())
            progress(len(batch))
    if dist.is_distributed():
        import torch

        torch.distributed.barrier()
    return merge(items, out, key)


def merge(items: Sequence[Item], out: Path, key: str) -> list[dict]:
    """All ranks' predictions in item order, one per id (the first written wins)."""
    found: dict[Any, dict] = {}
    for shard in sorted(out.glob("predictions.rank*.jsonl")):
        for line in shard.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            found.setdefault(record.get(key), record)
    merged = [found[it.id] for it in items if it.id in found]
    if dist.rank() == 0:
        atomic_write_text(out / "predictions.json", json.dumps(merged))
    return merged
