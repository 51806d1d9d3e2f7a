"""The Python API: ``blip2cli.load(name)`` returns a model that captions, answers, matches and embeds."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F

from .config import load_recipe
from .errors import Blip2Error
from .models.blip2 import Blip2ImageToText, Blip2Stage1
from .models.checkpoints import Checkpoint
from .models.vision import image_transform

ImageLike = Union[str, Path, "PIL.Image.Image"]  # noqa: F821

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Decoding:
    """Decoding settings; ``blip2cli/recipes/generate/*.yaml`` hold each model's defaults."""

    prompt: str = ""
    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    top_p: float = 0.9
    sample: bool = False
    num_captions: int = 1

    def generate_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                                  repetition_penalty=self.repetition_penalty, num_return_sequences=self.num_captions)
        if self.sample:
            kw.update(do_sample=True, top_p=self.top_p, num_beams=self.num_beams)
        else:
            if self.num_captions > self.num_beams:
                raise Blip2Error(f"--num-captions {self.num_captions} needs at least as many beams "
                                 f"(--num-beams {self.num_beams}), or --sample")
            kw.update(do_sample=False, num_beams=self.num_beams, length_penalty=self.length_penalty)
        return kw


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise Blip2Error(f"unknown dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise Blip2Error(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Blip2Error(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise Blip2Error(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise Blip2Error("device 'mps' requested but it is not available here")
    return dev


def open_image(image: ImageLike):
    """A PIL RGB image from a path or an image; a missing or unreadable file is a one-line error."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.exists():
        raise Blip2Error(f"{path}: no such file")
    if path.is_dir():
        raise Blip2Error(f"{path}: is a directory, not an image")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise Blip2Error(f"{path}: not an image file (or a format Pillow cannot read)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Blip2Error(f"{path}: corrupt or truncated image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def check_image(path: ImageLike) -> None:
    """Fail early, before a model loads, on a file Pillow cannot decode."""
    from PIL import Image

    if isinstance(path, Image.Image):
        return
    open_image(path).close()


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class Blip2:
    """A loaded BLIP-2 model with its tokenizers, image transform and decoding defaults."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        self.checkpoint = ckpt
        self.net = ckpt.net.to(device)
        self.config = ckpt.config
        self.device = device
        self.dtype = dtype
        self.transform = image_transform(ckpt.config.vision.image_size)
        self.defaults = (load_recipe(Decoding, f"generate/{ckpt.generation}") if ckpt.generation else Decoding())

    # ------------------------------------------------------------------ inputs
    def pixel_values(self, images: Sequence[ImageLike]) -> torch.Tensor:
        pixels = torch.stack([self.transform(open_image(im)) for im in images])
        return pixels.to(self.device)

    def _text(self, tokenizer, texts: Sequence[str], max_length: int | None = None):
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=max_length is not None,
                        max_length=max_length)
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    # ------------------------------------------------------------------ generation
    @property
    def can_generate(self) -> bool:
        return isinstance(self.net, Blip2ImageToText)

    def decoding(self, **overrides: Any) -> Decoding:
        """The model's default decoding with ``overrides`` (None values ignored)."""
        return replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None})

    @torch.inference_mode()
    def generate(self, images: Sequence[ImageLike], prompts: str | Sequence[str] | None = None,
                 batch_size: int = 8, **decoding: Any) -> list[str] | list[list[str]]:
        """Text for each image; a list of ``num_captions`` texts per image when that is above 1.

        ``prompts``: one prompt for all images, or one per image; default: the model's recipe prompt.
        ``decoding``: any field of ``Decoding`` (num_beams, max_new_tokens, ...).
        """
        if not self.can_generate:
            raise Blip2Error(f"{self.checkpoint.source} has no language model: it cannot generate text "
                             "(use itm/itc, or a blip2-opt/flan-t5 model)")
        settings = self.decoding(**decoding)
        prompts = self._prompts(images, prompts, settings.prompt)
        kwargs = settings.generate_kwargs()
        tok = self.checkpoint.tokenizer
        kwargs.setdefault("pad_token_id", tok.pad_token_id)
        texts: list[str] = []
        for part in _batches(len(images), max(1, batch_size)):
            pixels = self.pixel_values(images[part]).to(self.dtype)
            ids, mask = self._text(tok, prompts[part])
            out = self.net.generate(pixels, ids, mask, **kwargs)
            texts += [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
        if settings.num_captions > 1:
            n = settings.num_captions
            return [texts[i * n:(i + 1) * n] for i in range(len(images))]
        return texts

    @staticmethod
    def _prompts(images: Sequence, prompts: str | Sequence[str] | None, default: str) -> list[str]:
        if prompts is None:
            prompts = default
        if isinstance(prompts, str):
            return [prompts] * len(images)
        if len(prompts) != len(images):
            raise Blip2Error(f"{len(prompts)} prompts for {len(images)} images: give one, or one per image")
        return list(prompts)

    # ------------------------------------------------------------------ matching
    def _stage1(self) -> Blip2Stage1:
        if not isinstance(self.net, Blip2Stage1):
            raise Blip2Error(f"{self.checkpoint.source} has no ITM/ITC heads (use blip2-itm-vit-g or a stage-1 model)")
        if self.checkpoint.qformer_tokenizer is None:
            raise Blip2Error(f"{self.checkpoint.source} has no Q-Former tokenizer")
        return self.net

    def _image_embeds(self, images: Sequence[ImageLike]) -> torch.Tensor:
        return self.net.encode_image(self.pixel_values(images).to(self.dtype))

    @torch.inference_mode()
    def itm(self, images: Sequence[ImageLike], texts: Sequence[str], max_length: int = 32) -> torch.Tensor:
        """Probability that each image matches its paired text, ``(B,)``."""
        net = self._stage1()
        if len(images) != len(texts):
            raise Blip2Error(f"itm pairs images with texts: got {len(images)} images and {len(texts)} texts")
        ids, mask = self._text(self.checkpoint.qformer_tokenizer, texts, max_length)
        logits = net.itm_logits(self._image_embeds(images), ids, mask)
        return logits.float().softmax(dim=-1)[:, 1].cpu()

    @torch.inference_mode()
    def itc(self, images: Sequence[ImageLike], texts: Sequence[str], max_length: int = 32) -> torch.Tensor:
        """ITC similarity of every image with every text, ``(images, texts)``: best query's cosine."""
        net = self._stage1()
        ids, mask = self._text(self.checkpoint.qformer_tokenizer, texts, max_length)
        sims = net.similarity(net.image_features(self._image_embeds(images)), net.text_features(ids, mask))
        return sims.float().cpu()

    @torch.inference_mode()
    def extract_features(self, images: Sequence[ImageLike] | None = None, texts: Sequence[str] | None = None,
                         mode: str = "image", max_length: int = 32) -> dict[str, torch.Tensor]:
        """Q-Former features, as LAVIS's ``extract_features``.

        ``image``: query outputs and their normalised ITC projections; ``text``: text states and the
        normalised [CLS] projection; ``multimodal``: query outputs of the joint image-text pass.
        """
        if mode not in ("image", "text", "multimodal"):
            raise Blip2Error(f"unknown feature mode {mode!r}: expected image, text or multimodal")
        out: dict[str, torch.Tensor] = {}
        if mode in ("image", "multimodal") and not images:
            raise Blip2Error(f"{mode} features need images")
        if mode in ("text", "multimodal") and not texts:
            raise Blip2Error(f"{mode} features need texts")
        if mode == "image":
            embeds = self._image_embeds(images)
            out["image_embeds"] = self.net.query_output(embeds).float().cpu()
            if isinstance(self.net, Blip2Stage1):
                out["image_features"] = self.net.image_features(embeds).float().cpu()
            return out
        net = self._stage1()
        ids, mask = self._text(self.checkpoint.qformer_tokenizer, texts, max_length)
        if mode == "text":
            states = net.qformer(input_ids=ids, text_mask=mask, use_queries=False).hidden_states
            out["text_embeds"] = states.float().cpu()
            out["text_features"] = F.normalize(net.text_proj(states[:, 0]), dim=-1).float().cpu()
            return out
        res = net.qformer(image=self._image_embeds(images), input_ids=ids, text_mask=mask)
        out["multimodal_embeds"] = res.query_states.float().cpu()
        return out


def load(name_or_path: str, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
         llm: str | None = None) -> Blip2:
    """Load a BLIP-2 model by local path, registry name or Hugging Face id (see ``blip2 models``)."""
    from .models.hub import load_checkpoint

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    quiet_transformers()
    return Blip2(load_checkpoint(name_or_path, llm=llm, dtype=dt), dev, dt)


def quiet_transformers() -> None:
    """transformers' loading bars and advice would clutter stderr; errors still surface as ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


__all__ = ["Blip2", "Decoding", "load"]
