"""The per-rank trainer state of a checkpoint: step, data position and RNG states, as JSON.

JSON holds numbers and text only, so reading a state file cannot run code (a pickle can). States
written by blip2 0.1 (``state-rank*.pt``, a pickle) are still read, weights-only.
"""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..integrity import CorruptCheckpoint, weights_only_load


def state_file(trainer: Path, rank: int) -> Path:
    return trainer / f"state-rank{rank:03d}.json"


def _legacy_file(trainer: Path, rank: int) -> Path:
    return trainer / f"state-rank{rank:03d}.pt"


def _bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Python's, numpy's and torch's RNG states (and the current CUDA device's) as plain data."""
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(keys), gauss], "numpy": [name, mt.tolist(), int(pos), int(has_gauss),
                                                              float(cached)],
             "torch": _bytes(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _bytes(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` (or blip2 0.1's pickled state) recorded."""
    version, keys, gauss = state["python"]
    random.setstate((int(version), tuple(int(k) for k in keys), gauss))
    name, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(mt, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"] if isinstance(state["torch"], torch.Tensor) else _tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_tensor(state["cuda"]))


def write(trainer: Path, rank: int, state: dict[str, Any]) -> None:
    """Write one rank's state (flushed to disk before the checkpoint's manifest is made)."""
    path = state_file(trainer, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())


def read(trainer: Path, rank: int) -> dict[str, Any] | None:
    """One rank's state, None when the checkpoint has none for this rank."""
    path = state_file(trainer, rank)
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except (ValueError, OSError) as e:
            raise CorruptCheckpoint(f"{path}: unreadable ({e})") from None
    elif _legacy_file(trainer, rank).is_file():
        path = _legacy_file(trainer, rank)
        state = weights_only_load(path)
    else:
        return None
    if not isinstance(state, dict) or not {"step", "data", "rng", "engine"} <= set(state):
        raise CorruptCheckpoint(f"{path}: not a trainer state")
    return state
