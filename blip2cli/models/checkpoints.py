"""Find, load, save and export BLIP-2 checkpoints.

A model name resolves in this order: a local path (our checkpoint or run directory, a transformers
BLIP-2 directory, a LAVIS ``.pth``), a registry name, a Hugging Face hub id. Networks are built on the
meta device and take the loaded tensors as they are (no second copy); every key is accounted for. The
load dtype is then applied to the whole network at once (``apply_dtype``), buffers included.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import Blip2Error
from . import keymaps, registry
from .blip2 import Blip2Config, Blip2ImageToText, Blip2Stage1
from .llm import build_language_model
from .qformer import QFormerConfig
from .vision import VisionConfig

FORMAT_FILE = "blip2.json"
WEIGHTS_FILE = "model.safetensors"
# Kept in float32 whatever the load dtype: the trainable bridge (as transformers and LAVIS do).
FP32_PARTS = ("qformer", "ln_vision", "vision_proj", "text_proj", "itm_head", "temp")
FP32_PREFIXES = tuple(f"{p}." if p != "temp" else p for p in FP32_PARTS)


@dataclass
class Checkpoint:
    """A built network with what it needs to read inputs."""

    net: nn.Module  # Blip2ImageToText or Blip2Stage1
    config: Blip2Config
    tokenizer: Any  # the LLM's tokenizer (image-to-text) or None
    qformer_tokenizer: Any  # the Q-Former's BERT tokenizer, where the checkpoint has a text side
    generation: str | None  # name of the generation recipe with this model's decoding defaults
    source: str  # what was loaded, for messages and provenance
    # frozen components saved by reference, not by value: {"vision": "eva-g", "language_model": "opt-2.7b"}
    frozen_sources: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- configs


def config_from_hf(hf) -> Blip2Config:
    """Our config from a ``transformers.Blip2Config``."""
    v, q = hf.vision_config, hf.qformer_config
    if getattr(v, "hidden_act", "gelu") != "gelu" or not getattr(v, "qkv_bias", True):
        raise Blip2Error("unsupported vision config: BLIP-2 towers use exact GELU and q/v biases")
    archs = hf.architectures or []
    retrieval = "Blip2ForImageTextRetrieval" in archs or (q.use_qformer_text_input and not archs)
    vision = VisionConfig(kind="eva", image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size,
                          layers=v.num_hidden_layers, heads=v.num_attention_heads, mlp_dim=v.intermediate_size,
                          layer_norm_eps=v.layer_norm_eps)
    qformer = QFormerConfig(
        hidden_size=q.hidden_size, num_layers=q.num_hidden_layers, num_heads=q.num_attention_heads,
        intermediate_size=q.intermediate_size, encoder_width=v.hidden_size, num_query_tokens=hf.num_query_tokens,
        cross_attention_frequency=q.cross_attention_frequency, vocab_size=q.vocab_size,
        max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
        dropout=q.hidden_dropout_prob, attention_dropout=q.attention_probs_dropout_prob,
        pad_token_id=q.pad_token_id if q.pad_token_id is not None else 0,
        has_text=bool(retrieval), has_lm_head=False,
    )
    text = None if retrieval else hf.text_config.to_dict()
    return Blip2Config(vision=vision, qformer=qformer, text=text, embed_dim=hf.image_text_hidden_size,
                       ln_vision_eps=v.layer_norm_eps,
                       image_token_id=None if retrieval else hf.image_token_index)


def config_to_hf(cfg: Blip2Config):
    """A ``transformers.Blip2Config`` for our config (EVA-style towers only)."""
    from transformers import Blip2Config as HFConfig

    v, q = cfg.vision, cfg.qformer
    if v.kind != "eva":
        raise Blip2Error("transformers' BLIP-2 cannot represent a CLIP ViT-L tower; export needs an EVA ViT")
    vision = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers,
                  num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                  layer_norm_eps=v.layer_norm_eps, hidden_act="gelu", qkv_bias=True)
    qformer = dict(hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
                   intermediate_size=q.intermediate_size, cross_attention_frequency=q.cross_attention_frequency,
                   vocab_size=q.vocab_size, max_position_embeddings=q.max_position_embeddings,
                   layer_norm_eps=q.layer_norm_eps, hidden_dropout_prob=q.dropout,
                   attention_probs_dropout_prob=q.attention_dropout, pad_token_id=q.pad_token_id,
                   use_qformer_text_input=q.has_text, encoder_hidden_size=v.width)
    kwargs: dict[str, Any] = dict(vision_config=vision, qformer_config=qformer, num_query_tokens=q.num_query_tokens,
                                  image_text_hidden_size=cfg.embed_dim)
    if cfg.text is not None:
        kwargs.update(text_config=dict(cfg.text), image_token_index=cfg.image_token_id)
    hf = HFConfig(**kwargs)
    hf.architectures = ["Blip2ForConditionalGeneration" if cfg.text is not None else "Blip2ForImageTextRetrieval"]
    return hf


# --------------------------------------------------------------------------- tensors


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


def _assign(net: nn.Module, state: dict[str, torch.Tensor], what: str, allow_missing: set[str] = frozenset()) -> None:
    """Load ``state`` into a meta-device network by assignment; any missing or extra key is an error."""
    expected = set(net.state_dict().keys())
    tied = {"qformer.lm_head.decoder.weight"}  # the word embeddings, re-tied after loading
    missing = sorted(expected - set(state) - set(allow_missing) - tied)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise Blip2Error(f"{what}: {'; '.join(parts)}")
    net.load_state_dict(state, strict=False, assign=True)


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")


def _materialise(net: nn.Module, cfg: Blip2Config) -> None:
    """Fill what a checkpoint may omit (defaults, non-persistent buffers) and re-tie weights."""
    for name, p in list(net.named_parameters()):
        if p.is_meta and name == "temp":
            net.temp = nn.Parameter(torch.tensor([0.07]))
    for module in net.modules():
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                # timm's zero k-bias (non-persistent) and other derived buffers.
                module.register_buffer(bname, torch.zeros(buf.shape, dtype=buf.dtype),
                                       persistent=bname not in module._non_persistent_buffers_set)
    net.qformer.tie_weights()
    leftovers = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
    if leftovers:
        raise Blip2Error(f"weights missing after loading: {_few(leftovers)}")


def _set_k_bias(net: nn.Module, k_biases: dict[str, torch.Tensor]) -> None:
    for key, value in k_biases.items():
        net.get_submodule(key.rsplit(".", 1)[0]).k_bias = value


def apply_dtype(net: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Give every floating tensor of ``net`` the load dtype (None: float32), buffers included.

    The one place a load's dtype is applied, once the network holds all its tensors: the tower's
    non-persistent buffers (timm's k-bias) and anything else not read from the file follow the
    weights. ``FP32_PARTS`` stay float32; the language model keeps what transformers gave it when it
    loaded it in ``dtype`` (its own float32 exceptions included).
    """
    target = dtype or torch.float32
    for name, child in net.named_children():
        if name != "language_model":
            child.to(torch.float32 if name in FP32_PARTS else target)
    for name, param in net.named_parameters(recurse=False):
        if param.is_floating_point():
            param.data = param.data.to(torch.float32 if name in FP32_PARTS else target)
    return net


def build(cfg: Blip2Config, state: dict[str, torch.Tensor], lm_state: dict[str, torch.Tensor] | None,
          what: str, dtype: torch.dtype | None = None, allow_missing: set[str] = frozenset()) -> nn.Module:
    """A network from our-named tensors (``state``) and, for image-to-text, the LLM's own tensors."""
    state = keymaps.split_qkv_bias(state)
    k_biases = {k: state.pop(k) for k in [k for k in state if k.endswith("attn.k_bias")]}
    if cfg.text is not None:
        if lm_state is None:
            raise Blip2Error(f"{what}: no language-model weights")
        try:
            lm = build_language_model(cfg.text, lm_state, dtype=dtype or torch.float32)
        except Exception as e:  # transformers reports shape mismatches its own way
            raise Blip2Error(f"{what}: the language-model weights do not fit its config ({_first_line(e)})") from None
        with torch.device("meta"):
            net = Blip2ImageToText(cfg, language_model=lm)  # lm keeps its real tensors
        state = {k: v for k, v in state.items() if not k.startswith("language_model.")}
        expected_lm = {f"language_model.model.{k}" for k in lm.state_dict()}
        allow_missing = set(allow_missing) | expected_lm
    else:
        with torch.device("meta"):
            net = Blip2Stage1(cfg)
    _assign(net, state, what, allow_missing)
    _materialise(net, cfg)
    _set_k_bias(net, k_biases)
    return apply_dtype(net, dtype).eval()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --------------------------------------------------------------------------- tokenizers


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


def _tokenizer(path: Path, padding_side: str | None = None):
    from transformers import AutoTokenizer

    refuse_remote_code(path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if padding_side:
        tok.padding_side = padding_side
    return tok


def _llm_padding_side(cfg: Blip2Config) -> str:
    is_enc_dec = bool(cfg.text and cfg.text.get("is_encoder_decoder"))
    return "right" if is_enc_dec else "left"


# --------------------------------------------------------------------------- transformers directories


def load_hf_dir(path: Path, dtype: torch.dtype | None = None, generation: str | None = None) -> Checkpoint:
    """A transformers ``Blip2ForConditionalGeneration`` / ``Blip2ForImageTextRetrieval`` directory."""
    from transformers import Blip2Config as HFConfig

    path = Path(path)
    refuse_remote_code(path)
    try:
        hf = HFConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:
        raise Blip2Error(f"{path}: not a BLIP-2 checkpoint directory ({_first_line(e)})") from None
    cfg = config_from_hf(hf)
    raw = read_safetensors_dir(path)
    lm_state = {k[len("language_model."):]: raw.pop(k) for k in [k for k in raw if k.startswith("language_model.")]}
    state, unknown = keymaps.translate(raw, keymaps.HF_KEYS.to_ours,
                                       skip=("embeddings.position_ids", "qformer.embeddings.position_ids"))
    if unknown:
        raise Blip2Error(f"{path}: unexpected keys {_few(sorted(unknown))}")
    net = build(cfg, state, lm_state if cfg.text is not None else None, str(path), dtype,
                allow_missing={"temp"})
    tok = _tokenizer(path, _llm_padding_side(cfg)) if cfg.text is not None else None
    qtok = _tokenizer(path) if cfg.text is None else None
    return Checkpoint(net, cfg, tok, qtok, generation if cfg.text is not None else None, str(path))


# --------------------------------------------------------------------------- our own format


def is_ours(path: Path) -> bool:
    """Whether ``path`` is a checkpoint in blip2's own format."""
    return (path / FORMAT_FILE).exists()


def _run_latest(path: Path) -> Path | None:
    """The checkpoint ``path/latest`` names (a symlink or the text form), None without a usable pointer."""
    from ..train.rundir import latest

    return latest(path)


def verify(path: Path) -> None:
    """Check a checkpoint of ours against its ``manifest.json`` (sizes and SHA-256 of every file), when it
    has one; a missing, truncated or altered file is one line naming it."""
    from ..integrity import CorruptCheckpoint
    from ..integrity import verify as verify_manifest

    try:
        verify_manifest(path, require_manifest=False, with_trainer=False)
    except CorruptCheckpoint as e:
        raise CorruptCheckpoint(f"{e}: the checkpoint {path} is damaged; load another of its run's checkpoints "
                                "(step-NNNNNN) or copy it again") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; an unreadable one is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except FileNotFoundError:
        raise Blip2Error(f"{path}: missing") from None
    except (SafetensorError, OSError) as e:
        raise Blip2Error(f"{path}: not a readable safetensors file ({_first_line(e)}); truncated or damaged?") from None


def load_ours(path: Path, dtype: torch.dtype | None = None) -> Checkpoint:
    path = Path(path)
    meta = json.loads((path / FORMAT_FILE).read_text())
    cfg = Blip2Config.from_dict(meta["config"])
    state = _read_weights(path / WEIGHTS_FILE)
    sources = meta.get("frozen_sources", {})
    if "vision" in sources:
        state.update(_tower_weights(sources["vision"], cfg))
    lm_state = None
    if cfg.text is not None:
        prefix = "language_model.model."
        lm_state = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        if "language_model" in sources:
            from .lavis import load_llm

            lm_state = load_llm(sources["language_model"])[1]
    net = build(cfg, state, lm_state, str(path), dtype)
    tok = _tokenizer(path / "tokenizer", _llm_padding_side(cfg)) if (path / "tokenizer").exists() else None
    qtok = _tokenizer(path / "qformer_tokenizer") if (path / "qformer_tokenizer").exists() else None
    return Checkpoint(net, cfg, tok, qtok, meta.get("generation"), str(path), dict(sources))


def _tower_weights(name: str, cfg: Blip2Config) -> dict[str, torch.Tensor]:
    """A registry tower's weights (the frozen ViT a checkpoint refers to), under our names."""
    from .hub import download_url
    from .lavis import read_pth, tower_state

    entry = registry.lookup(name, kind="tower")
    if entry is None:
        raise Blip2Error(f"frozen tower {name!r}: not a registry tower")
    return tower_state(read_pth(download_url(entry.where)), cfg.vision, name)


def _atomic_dir(out: Path):
    """A temporary sibling directory that replaces ``out`` in one rename once filled."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _commit_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _full_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The network's tensors with timm's (non-persistent) k-biases and without tied duplicates."""
    state = {k: v for k, v in net.state_dict().items() if k != "qformer.lm_head.decoder.weight"}
    for name, module in net.named_modules():
        if getattr(module, "k_bias", None) is not None and name.startswith("vision."):
            state[f"{name}.k_bias"] = module.k_bias
    return state


def write_model(ckpt: Checkpoint, out: Path, extra: dict[str, Any] | None = None,
                state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``ckpt`` in our format into the existing directory ``out`` (``state``: weights to use instead
    of the network's own, e.g. gathered from ZeRO-3 partitions)."""
    from safetensors.torch import save_file

    tensors = _full_state(ckpt.net) if state is None else {
        k: v for k, v in state.items() if k != "qformer.lm_head.decoder.weight"}
    by_reference = tuple(f"{name}." for name in ckpt.frozen_sources)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(by_reference)} if by_reference else tensors
    tensors = _untie_for_saving({k: v.detach().contiguous() for k, v in tensors.items()})
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    meta = {"format": "blip2", "version": 1, "config": ckpt.config.to_dict(), "generation": ckpt.generation,
            "frozen_sources": ckpt.frozen_sources, **(extra or {})}
    (out / FORMAT_FILE).write_text(json.dumps(meta, indent=2))
    if ckpt.tokenizer is not None:
        ckpt.tokenizer.save_pretrained(out / "tokenizer")
    if ckpt.qformer_tokenizer is not None:
        ckpt.qformer_tokenizer.save_pretrained(out / "qformer_tokenizer")


def save(ckpt: Checkpoint, out: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``ckpt`` in our format (config, safetensors, tokenizers), atomically."""
    tmp = _atomic_dir(out)
    try:
        write_model(ckpt, tmp, extra)
        _commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _untie_for_saving(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


# --------------------------------------------------------------------------- export to transformers


def export_hf(ckpt: Checkpoint, out: Path) -> Path:
    """Write a directory ``transformers`` loads as ``Blip2ForConditionalGeneration`` or ``Blip2ForImageTextRetrieval``.

    An image-to-text model without an ``<image>`` token gets one; when the LLM's vocabulary has no
    free row for it, the exported embeddings (and LM head) grow by that one row.
    """
    from safetensors.torch import save_file

    cfg, tok = ckpt.config, ckpt.tokenizer if ckpt.config.text is not None else ckpt.qformer_tokenizer
    grown: dict[str, torch.Tensor] = {}
    if cfg.text is not None and cfg.image_token_id is None:
        cfg, tok = _with_image_token(cfg, tok)
        if cfg.text["vocab_size"] > ckpt.config.text["vocab_size"]:
            grown = grown_embeddings(ckpt.net.language_model.model, cfg.text["vocab_size"])
    hf = config_to_hf(cfg)
    if cfg.ln_vision_eps != cfg.vision.layer_norm_eps:
        print(f"note: transformers' BLIP-2 normalises the ViT output with the tower's LayerNorm eps "
              f"({cfg.vision.layer_norm_eps:g}); this model's ln_vision uses {cfg.ln_vision_eps:g}", file=sys.stderr)
    ours = keymaps.fuse_qkv_bias(_full_state(ckpt.net))
    ours.update({f"language_model.model.{k}": v for k, v in grown.items()})
    state: dict[str, torch.Tensor] = {}
    for key, value in ours.items():
        if key == "temp" or key.startswith("qformer.lm_head."):
            continue  # transformers' classes have no temperature and no Q-Former LM head
        new = keymaps.HF_KEYS.to_theirs(key)
        if new is None:
            raise Blip2Error(f"cannot export {key}: no transformers counterpart")
        state[new] = value.detach().contiguous()
    state = _untie_for_saving(state)
    tmp = _atomic_dir(out)
    try:
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        hf.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        _write_preprocessor(tmp, cfg.vision.image_size)
        _commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _with_image_token(cfg: Blip2Config, tokenizer):
    """transformers places the soft prompts at ``<image>`` ids: give the tokenizer one (LAVIS files and
    blip2's own runs lack it), and the LLM config a vocabulary that holds it."""
    import copy
    from dataclasses import replace

    tok = copy.deepcopy(tokenizer)
    if "<image>" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    image_id = tok.convert_tokens_to_ids("<image>")
    text = dict(cfg.text, vocab_size=max(cfg.text["vocab_size"], image_id + 1))
    return replace(cfg, text=text, image_token_id=image_id), tok


def grown_embeddings(lm: nn.Module, rows: int) -> dict[str, torch.Tensor]:
    """The LLM's input embeddings and LM head grown to ``rows``, under the LLM's state-dict names.

    What ``resize_token_embeddings`` does, deterministically: each new row is the mean of the old ones
    (transformers draws it from a normal of that mean). An LM-head row that is the mean of the others
    gives the mean of their logits, never above the largest, so greedy search cannot pick the new token.
    Tied weights stay one tensor.
    """
    targets = [lm.get_input_embeddings().weight]
    if lm.get_output_embeddings() is not None:
        targets.append(lm.get_output_embeddings().weight)
    new: dict[int, torch.Tensor] = {}
    for weight in targets:
        if id(weight) not in new:
            old = weight.detach()
            extra = old.float().mean(dim=0, keepdim=True).to(old.dtype).expand(rows - old.shape[0], -1)
            new[id(weight)] = torch.cat([old, extra])
    return {name: new[id(p)] for name, p in lm.named_parameters(remove_duplicate=False) if id(p) in new}


def _write_preprocessor(path: Path, size: int) -> None:
    from .vision import CLIP_MEAN, CLIP_STD

    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True,
    }, indent=2))
