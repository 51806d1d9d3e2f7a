"""The Python API: ``blip2cli.load(name)`` returns a model that captions, answers, matches and embeds."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Union

import torch
import torch.nn.functional as F

from .config import load_recipe
from .runtime.devices import resolve_device, resolve_dtype
from .runtime.errors import Blip2Error
from .runtime.progress import quiet_transformers
from .images import MAX_PIXELS, open_rgb
from .models.blip2 import Blip2ImageToText, Blip2Stage1
from .models.assemble import Checkpoint
from .models.decoding import Decoding
from .models.qformer_text import qformer_text
from .models.sampling import row_seed
from .models.vision import image_transform

ImageLike = Union[str, os.PathLike, "PIL.Image.Image"]  # noqa: F821
Text = Union[str, list[str]]  # one text, or num_captions texts, for one image
OnError = Callable[[Any, Blip2Error], None]


def _image_list(images: ImageLike | Sequence[ImageLike]) -> tuple[list[ImageLike], bool]:
    """The images as a list, and whether a single image (rather than a sequence) was given."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images], True
    return list(images), False


def _text_list(texts: str | Sequence[str]) -> tuple[list[str], bool]:
    """The texts as a list, and whether a single string was given (never iterated by character)."""
    if isinstance(texts, str):
        return [texts], True
    return list(texts), False


def _pairs(images: list, one_image: bool, texts: list[str], one_text: bool, what: str) -> tuple[list, list[str]]:
    """Images and texts paired one to one; a single image or text goes with every item of the other."""
    if one_image and not one_text:
        images = images * len(texts)
    elif one_text and not one_image:
        texts = texts * len(images)
    if len(images) != len(texts):
        raise Blip2Error(f"{what} pairs images with texts: got {len(images)} images and {len(texts)} texts")
    return images, texts


def _image_key(image: ImageLike, index: int) -> str:
    """What sampling seeds an image's texts from: its path, or for an image in memory its place in the call."""
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"#{index}"


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class Blip2:
    """A loaded BLIP-2 model with its tokenizers, image transform and decoding defaults.

    ``max_pixels``: larger images are refused from their header, before decoding.
    ``exif_transpose``: turn images upright by their EXIF orientation; off by default, as LAVIS, whose
    benchmark numbers come from the stored pixels.
    """

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
                 max_pixels: int = MAX_PIXELS, exif_transpose: bool = False) -> None:
        self.checkpoint = ckpt
        self.max_pixels = max_pixels
        self.exif_transpose = exif_transpose
        self.net = ckpt.net.to(device)
        self.config = ckpt.config
        self.device = device
        self.dtype = dtype
        self.transform = image_transform(ckpt.config.vision.image_size)
        # a model without a generation recipe of its own decodes as the stage-2 pretrained models do
        self.defaults = load_recipe(Decoding, f"generate/{ckpt.generation or 'caption'}")

    # ------------------------------------------------------------------ inputs
    def pixel_values(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """The transformed pixels of the images (one image: a batch of one), on the model's device."""
        pixels = torch.stack([self.transform(self.read_image(im)) for im in _image_list(images)[0]])
        return pixels.to(self.device)

    def read_image(self, image: ImageLike, max_pixels: int | None = None, exif_transpose: bool | None = None):
        """The image as RGB under this model's image rules, or the ones given (``None``: the model's)."""
        return open_rgb(image, max_pixels=self.max_pixels if max_pixels is None else max_pixels,
                        exif_transpose=self.exif_transpose if exif_transpose is None else exif_transpose)

    def _prompt_ids(self, prompts: Sequence[str]):
        """The LLM's prompts, padded to the longest (never cut)."""
        enc = self.checkpoint.tokenizer(list(prompts), return_tensors="pt", padding=True)
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def _qformer_text(self, texts: Sequence[str], max_length: int | None):
        """Texts for the Q-Former, cut at ``max_length`` tokens (``None``: the checkpoint's ``max_txt_len``, the
        length its Q-Former was trained with)."""
        if max_length is None:
            max_length = self.config.qformer.max_txt_len
        return qformer_text(self.checkpoint.qformer_tokenizer, texts, max_length, self.device)

    # ------------------------------------------------------------------ generation
    @property
    def can_generate(self) -> bool:
        return isinstance(self.net, Blip2ImageToText)

    @property
    def reads_questions(self) -> bool:
        """Whether the Q-Former reads the question with the queries (a VQA fine-tune)."""
        return self.can_generate and self.config.qformer_text_input

    def decoding(self, **overrides: Any) -> Decoding:
        """The model's default decoding with the user's ``overrides`` (see ``Decoding.with_overrides``)."""
        return self.defaults.with_overrides(**overrides)

    @torch.inference_mode()
    def generate(self, images: ImageLike | Sequence[ImageLike], prompts: str | Sequence[str] | None = None,
                 batch_size: int = 8, on_error: OnError | None = None, max_pixels: int | None = None,
                 exif_transpose: bool | None = None, questions: str | Sequence[str] | None = None,
                 **decoding: Any) -> Text | None | list[Text | None]:
        """Text for one image (a str), or for each of a list of images (a list).

        With ``num_captions`` above 1, each image's text is a list of that many texts.
        ``prompts``: one prompt for all images, or one per image; default: the model's recipe prompt.
        ``questions``: for a model whose Q-Former reads the question (a VQA fine-tune), the question of each prompt;
        by default the ``{}`` of the model's prompt template in each prompt, or else the prompt itself, which then
        goes into the template ("what is it?" -> "Question: what is it? Answer:").
        ``decoding``: any field of ``Decoding`` (num_beams, max_new_tokens, sample, ...), over the model's recipe.
        ``on_error``: called with an image that cannot be read and its error, instead of raising; that
        image's result is ``None`` and the other images of its batch are still generated.
        ``max_pixels``, ``exif_transpose``: this call's image rules (default: the model's, see ``Blip2``).
        """
        if not self.can_generate:
            raise Blip2Error(f"{self.checkpoint.source} has no language model: it cannot generate text "
                             "(use itm/itc, or a blip2-opt/flan-t5 model)")
        items, single = _image_list(images)
        settings = self.decoding(**decoding)
        texts_in = self._prompts(len(items), prompts, settings.prompt or "")
        questions_in = None
        if self.reads_questions:
            questions_in = self._prompts(len(items), questions, "") if questions is not None else None
            texts_in, questions_in = questions_and_prompts(texts_in, questions_in, settings.prompt or "",
                                                           self.checkpoint.source)
        kwargs = settings.generate_kwargs(decoder_only=not self.net.language_model.is_encoder_decoder)
        kwargs.setdefault("pad_token_id", self.checkpoint.tokenizer.pad_token_id)
        results: list[Text | None] = [None] * len(items)
        read = partial(self.read_image, max_pixels=max_pixels, exif_transpose=exif_transpose)
        seed = settings.seed if settings.seed is not None else int(torch.randint(0, 2**31, ()))
        for part in _batches(len(items), max(1, batch_size)):
            readable = self._read_images(items, range(part.start, part.stop), read, on_error)
            if readable:
                if settings.sample:  # a text's draws depend on the seed and its image (file, or place), not the batch
                    kwargs["row_seeds"] = torch.tensor([row_seed(seed, _image_key(items[i], i), j) for i in readable
                                                        for j in range(settings.num_captions or 1)])
                texts = self._generate_batch(list(readable.values()), [texts_in[i] for i in readable], kwargs,
                                             None if questions_in is None else [questions_in[i] for i in readable])
                for i, text in zip(readable, self._per_image(texts, settings.num_captions or 1)):
                    results[i] = text
        return results[0] if single else results

    def _read_images(self, items: list[ImageLike], indices: range, read: Callable[[ImageLike], Any],
                     on_error: OnError | None) -> dict[int, torch.Tensor]:
        """Transformed pixels of the readable images among ``items[indices]``, by index. An image given more than
        once (the same path, or the same PIL image) is read once, and its items share one tensor."""
        pixels: dict[int, torch.Tensor] = {}
        seen: dict[Any, torch.Tensor | Blip2Error] = {}
        for i in indices:
            key = os.fspath(items[i]) if isinstance(items[i], (str, os.PathLike)) else id(items[i])
            if key not in seen:
                try:
                    seen[key] = self.transform(read(items[i]))
                except Blip2Error as e:
                    if on_error is None:
                        raise
                    seen[key] = e
                    on_error(items[i], e)
            if isinstance(seen[key], torch.Tensor):
                pixels[i] = seen[key]
        return pixels

    def _generate_batch(self, pixels: list[torch.Tensor], prompts: list[str], kwargs: dict[str, Any],
                        questions: list[str] | None = None) -> list[str]:
        """Texts for (image, prompt) pairs; an image shared by several prompts goes through the ViT (and a
        question-blind Q-Former) once. ``questions``: what a question-reading Q-Former reads, one per prompt."""
        tok = self.checkpoint.tokenizer
        ids, mask = self._prompt_ids(prompts)
        if questions is not None:
            kwargs = {**kwargs, **dict(zip(("question_ids", "question_mask"), self._qformer_text(questions, None)))}
        slots: dict[int, int] = {}
        index = torch.tensor([slots.setdefault(id(p), len(slots)) for p in pixels], device=self.device)
        unique = list({id(p): p for p in pixels}.values())
        out = self.net.generate(torch.stack(unique).to(self.device, self.dtype), ids, mask,
                                image_index=None if len(unique) == len(pixels) else index, **kwargs)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

    @staticmethod
    def _per_image(texts: list[str], n: int) -> list[Text]:
        """Decoded texts grouped by image: ``n`` consecutive texts each when ``n`` is above 1."""
        if n == 1:
            return list(texts)
        return [texts[i:i + n] for i in range(0, len(texts), n)]

    @staticmethod
    def _prompts(count: int, prompts: str | Sequence[str] | None, default: str) -> list[str]:
        if prompts is None:
            prompts = default
        if isinstance(prompts, str):
            return [prompts] * count
        prompts = list(prompts)
        if len(prompts) != count:
            raise Blip2Error(f"{len(prompts)} prompts for {count} images: give one, or one per image")
        return prompts

    # ------------------------------------------------------------------ matching
    def matching_network(self) -> Blip2Stage1:
        """The stage-1 network with its ITM and ITC heads; a model without them is a one-line error."""
        if not isinstance(self.net, Blip2Stage1):
            raise Blip2Error(f"{self.checkpoint.source} has no ITM/ITC heads (use blip2-itm-vit-g or a stage-1 model)")
        if self.checkpoint.qformer_tokenizer is None:
            raise Blip2Error(f"{self.checkpoint.source} has no Q-Former tokenizer")
        return self.net

    def image_embeds(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """The frozen tower's output for ``images`` (opened and transformed as every method does)."""
        return self.net.encode_image(self.pixel_values(images).to(self.dtype))

    @torch.inference_mode()
    def itm(self, images: ImageLike | Sequence[ImageLike], texts: str | Sequence[str],
            max_length: int | None = None) -> torch.Tensor | float:
        """Probability that each image matches its paired text, ``(B,)``; a float for one image and one text.

        A single image is paired with every text, and a single text with every image. ``max_length``: text
        tokens kept, [CLS] and [SEP] included (default: the checkpoint's ``qformer.max_txt_len``, the length its
        Q-Former was trained with: 32 for BLIP-2's); the same holds for ``itc`` and ``extract_features``.
        """
        net = self.matching_network()
        ims, one_image = _image_list(images)
        txts, one_text = _text_list(texts)
        ims, txts = _pairs(ims, one_image, txts, one_text, "itm")
        ids, mask = self._qformer_text(txts, max_length)
        probs = net.itm_logits(self.image_embeds(ims), ids, mask).float().softmax(dim=-1)[:, 1].cpu()
        return probs.item() if one_image and one_text else probs

    @torch.inference_mode()
    def itc(self, images: ImageLike | Sequence[ImageLike], texts: str | Sequence[str],
            max_length: int | None = None) -> torch.Tensor | float:
        """ITC similarity of every image with every text, ``(images, texts)``: best query's cosine.

        A single image (or text) drops its dimension: ``(texts,)``, ``(images,)``, or a float for both.
        """
        net = self.matching_network()
        ims, one_image = _image_list(images)
        txts, one_text = _text_list(texts)
        ids, mask = self._qformer_text(txts, max_length)
        sims = net.similarity(net.image_features(self.image_embeds(ims)), net.text_features(ids, mask)).float().cpu()
        if one_image and one_text:
            return sims[0, 0].item()
        return sims[0] if one_image else sims[:, 0] if one_text else sims

    @torch.inference_mode()
    def extract_features(self, images: ImageLike | Sequence[ImageLike] | None = None,
                         texts: str | Sequence[str] | None = None, mode: str = "image",
                         max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Q-Former features, as LAVIS's ``extract_features``.

        ``image``: query outputs and their normalised ITC projections; ``text``: text states and the
        normalised [CLS] projection; ``multimodal``: query outputs of the joint image-text pass (a single
        image or text goes with every item of the other). Features of a single image, text or pair have
        no batch dimension.
        """
        if mode not in ("image", "text", "multimodal"):
            raise Blip2Error(f"unknown feature mode {mode!r}: expected image, text or multimodal")
        ims, one_image = _image_list(images) if images is not None else ([], False)
        txts, one_text = _text_list(texts) if texts is not None else ([], False)
        if mode in ("image", "multimodal") and not ims:
            raise Blip2Error(f"{mode} features need images")
        if mode in ("text", "multimodal") and not txts:
            raise Blip2Error(f"{mode} features need texts")
        if mode == "image":
            return _unbatch(self._image_features(ims), one_image)
        net = self.matching_network()
        if mode == "text":
            ids, mask = self._qformer_text(txts, max_length)
            states = net.qformer(input_ids=ids, text_mask=mask, use_queries=False).hidden_states
            out = {"text_embeds": states.float().cpu(),
                   "text_features": F.normalize(net.text_proj(states[:, 0]), dim=-1).float().cpu()}
            return _unbatch(out, one_text)
        ims, txts = _pairs(ims, one_image, txts, one_text, "multimodal features")
        ids, mask = self._qformer_text(txts, max_length)
        res = net.qformer(image=self.image_embeds(ims), input_ids=ids, text_mask=mask)
        return _unbatch({"multimodal_embeds": res.query_states.float().cpu()}, one_image and one_text)

    def _image_features(self, images: list[ImageLike]) -> dict[str, torch.Tensor]:
        embeds = self.image_embeds(images)
        out = {"image_embeds": self.net.query_output(embeds).float().cpu()}
        if isinstance(self.net, Blip2Stage1):
            out["image_features"] = self.net.image_features(embeds).float().cpu()
        return out


def questions_and_prompts(prompts: list[str], questions: list[str] | None, template: str,
                          source: str) -> tuple[list[str], list[str]]:
    """The LLM prompts and the questions of a model that reads the question. Without ``questions``: a prompt that
    fills the ``{}`` of ``template`` gives its question; any other prompt is the question, put into the template."""
    if "{}" not in template:
        template = "{}"
    before, after = template.split("{}", 1)
    pattern = re.compile(re.escape(before) + "(.*)" + re.escape(after), re.DOTALL)
    out_prompts, out_questions = [], []
    for i, prompt in enumerate(prompts):
        if questions is not None:
            question = questions[i]
        else:
            match = pattern.fullmatch(prompt)
            question = match.group(1).strip() if match else prompt.strip()
            if "{}" in prompt:  # the template itself (no prompt given): no question
                question = ""
            if not match:
                prompt = template.format(question)
        if not question:
            raise Blip2Error(f"{source} answers questions (its Q-Former reads them): give the question as the prompt")
        out_prompts.append(prompt)
        out_questions.append(question)
    return out_prompts, out_questions


def _unbatch(features: dict[str, torch.Tensor], single: bool) -> dict[str, torch.Tensor]:
    """Features without their batch dimension when they belong to a single input."""
    return {k: v[0] for k, v in features.items()} if single else features


def load(name_or_path: str, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
         llm: str | None = None, max_pixels: int = MAX_PIXELS, exif_transpose: bool = False) -> Blip2:
    """Load a BLIP-2 model by local path, registry name or Hugging Face id (see ``blip2 models``).

    ``max_pixels`` and ``exif_transpose`` are the image rules of every call (see ``Blip2``).
    """
    from .models.resolve import load_checkpoint

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    quiet_transformers()
    return Blip2(load_checkpoint(name_or_path, llm=llm, dtype=dt), dev, dt, max_pixels, exif_transpose)


__all__ = ["Blip2", "Decoding", "load"]
