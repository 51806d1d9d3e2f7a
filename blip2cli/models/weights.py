"""Reading and writing tensors and tokenizers: safetensors directories, PyTorch files (weights only,
never unpickled objects), and the refusal of any checkpoint that asks to run its own code."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..runtime.errors import Blip2Error


WEIGHTS_FILE = "model.safetensors"


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers-style directory (single or sharded safetensors, or a .bin)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / WEIGHTS_FILE).exists():
        files = [WEIGHTS_FILE]
    elif (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise Blip2Error(f"{path}: no model.safetensors or pytorch_model.bin in this directory")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(path / f))
    return state


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; an unreadable one is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except FileNotFoundError:
        raise Blip2Error(f"{path}: missing") from None
    except (SafetensorError, OSError) as e:
        raise Blip2Error(f"{path}: not a readable safetensors file ({first_line(e)}); truncated or damaged?") from None


def read_pth(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch file (a state dict, or a dict holding one under ``model``), read weights-only;
    anything else is a one-line error."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise Blip2Error(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0][:120]})") from None
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise Blip2Error(f"{path}: expected a state dict (or a dict with a 'model' state dict)")
    return raw


def untie_for_saving(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: keep one copy of each tied tensor, drop the aliases."""
    seen: dict[tuple, str] = {}
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.device.type != "meta" else (k,)
        if key in seen:
            continue
        seen[key] = k
        out[k] = v
    return out


def refuse_remote_code(path: Path) -> None:
    """A directory whose config or tokenizer config names code of its own (``auto_map``) is refused: blip2
    never runs a checkpoint's code (and passes ``trust_remote_code=False`` to transformers throughout)."""
    for name in ("config.json", "tokenizer_config.json"):
        file = Path(path) / name
        try:
            data = json.loads(file.read_text()) if file.is_file() else {}
        except (OSError, ValueError):
            continue  # unreadable files are reported by whatever reads them next
        if isinstance(data, dict) and data.get("auto_map"):
            raise Blip2Error(f"{path}: {name} asks to run the checkpoint's own code (auto_map), which blip2 never "
                             "does; use a model that transformers supports natively")


def load_tokenizer(path: Path, padding_side: str | None = None):
    """A transformers tokenizer from a directory, never running the checkpoint's own code."""
    from transformers import AutoTokenizer

    refuse_remote_code(path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if padding_side:
        tok.padding_side = padding_side
    return tok


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def few_keys(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")
