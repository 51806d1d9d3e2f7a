"""blip2's own checkpoint format: ``blip2.json`` (config, generation recipe, frozen parts saved by reference),
``model.safetensors``, the tokenizers, and a ``manifest.json`` of sizes and SHA-256."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...integrity import CorruptCheckpoint
from ...integrity import verify as verify_manifest
from ...runtime.io import atomic_dir
from ..assemble import Checkpoint, build, full_state, llm_padding_side
from ..blip2 import Blip2Config
from ..components import load_llm, registry_tower_state
from ..weights import WEIGHTS_FILE, load_tokenizer, read_safetensors, untie_for_saving


FORMAT_FILE = "blip2.json"


def is_ours(path: Path) -> bool:
    """Whether ``path`` is a checkpoint in blip2's own format."""
    return (path / FORMAT_FILE).exists()


def verify(path: Path) -> None:
    """Check a checkpoint of ours against its ``manifest.json`` (sizes and SHA-256 of every file), when it
    has one; a missing, truncated or altered file is one line naming it."""
    try:
        verify_manifest(path, require_manifest=False, with_trainer=False)
    except CorruptCheckpoint as e:
        raise CorruptCheckpoint(f"{e}: the checkpoint {path} is damaged; load another of its run's checkpoints "
                                "(step-NNNNNN) or copy it again") from None


def load_ours(path: Path, dtype: torch.dtype | None = None) -> Checkpoint:
    """A checkpoint in blip2's own format; frozen parts saved by reference are fetched from their sources."""
    path = Path(path)
    meta = json.loads((path / FORMAT_FILE).read_text())
    cfg = Blip2Config.from_dict(meta["config"])
    state = read_safetensors(path / WEIGHTS_FILE)
    sources = meta.get("frozen_sources", {})
    if "vision" in sources:
        state.update(registry_tower_state(sources["vision"], cfg.vision))
    lm_state = None
    if cfg.text is not None:
        prefix = "language_model.model."
        lm_state = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        if "language_model" in sources:
            lm_state = load_llm(sources["language_model"])[1]
    net = build(cfg, state, lm_state, str(path), dtype)
    tok = load_tokenizer(path / "tokenizer", llm_padding_side(cfg)) if (path / "tokenizer").exists() else None
    qtok = load_tokenizer(path / "qformer_tokenizer") if (path / "qformer_tokenizer").exists() else None
    return Checkpoint(net, cfg, tok, qtok, meta.get("generation"), str(path), dict(sources))


def write_model(ckpt: Checkpoint, out: Path, extra: dict[str, Any] | None = None,
                state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``ckpt`` in our format into the existing directory ``out`` (``state``: weights to use instead
    of the network's own, e.g. gathered from ZeRO-3 partitions)."""
    from safetensors.torch import save_file

    tensors = full_state(ckpt.net) if state is None else {
        k: v for k, v in state.items() if k != "qformer.lm_head.decoder.weight"}
    by_reference = tuple(f"{name}." for name in ckpt.frozen_sources)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(by_reference)} if by_reference else tensors
    tensors = untie_for_saving({k: v.detach().contiguous() for k, v in tensors.items()})
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    meta = {"format": "blip2", "version": 1, "config": ckpt.config.to_dict(), "generation": ckpt.generation,
            "frozen_sources": ckpt.frozen_sources, **(extra or {})}
    (out / FORMAT_FILE).write_text(json.dumps(meta, indent=2))
    if ckpt.tokenizer is not None:
        ckpt.tokenizer.save_pretrained(out / "tokenizer")
    if ckpt.qformer_tokenizer is not None:
        ckpt.qformer_tokenizer.save_pretrained(out / "qformer_tokenizer")


def save(ckpt: Checkpoint, out: Path, extra: dict[str, Any] | None = None,
         add_files: Callable[[Path], None] | None = None) -> Path:
    """Write ``ckpt`` in our format (config, safetensors, tokenizers), atomically. ``add_files`` adds files (e.g. the
    model card) to the directory before it takes its name: a failure there leaves ``out`` as it was."""
    with atomic_dir(out) as tmp:
        write_model(ckpt, tmp, extra)
        if add_files is not None:
            add_files(tmp)
    return out
