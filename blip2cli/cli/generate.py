"""``blip2 generate IMAGE... [PROMPT]``: captions or answers for images, as text or JSON lines."""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import Blip2Error

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _looks_like_image_arg(arg: str) -> bool:
    return Path(arg).exists() or glob.has_magic(arg) or Path(arg).suffix.lower() in IMAGE_SUFFIXES


def split_arguments(args: list[str]) -> tuple[list[str], str | None]:
    """IMAGE... [PROMPT]: the last argument is the prompt when it is not a path, glob or image name."""
    if len(args) > 1 and not _looks_like_image_arg(args[-1]):
        return args[:-1], args[-1]
    return args, None


def expand_images(args: list[str]) -> list[str]:
    """Files as given, directories as their image files (sorted), globs as their matches (sorted)."""
    images: list[str] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise Blip2Error(f"{arg}: directory holds no image files")
            images += found
        elif glob.has_magic(arg) and not path.exists():
            found = sorted(glob.glob(arg))
            if not found:
                raise Blip2Error(f"{arg}: no files match")
            images += found
        elif not path.exists():
            raise Blip2Error(f"{arg}: no such file")
        else:
            images.append(arg)
    return images


def generate(
    args: Annotated[list[str], typer.Argument(metavar="IMAGE... [PROMPT]",
                                              help="Image files, directories or globs, then an optional prompt.")],
    model: Annotated[str, typer.Option(help="Registry name, Hugging Face id or directory, LAVIS .pth, or run directory.")] = "blip2-opt-2.7b",
    llm: Annotated[Optional[str], typer.Option(help="The LLM of a LAVIS stage-2 .pth (registry name, hub id or directory).")] = None,
    num_beams: Annotated[Optional[int], typer.Option(min=1, help="Beam width (default: the model's recipe).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(min=1)] = None,
    min_new_tokens: Annotated[Optional[int], typer.Option(min=0)] = None,
    length_penalty: Annotated[Optional[float], typer.Option(help="Beam length penalty; -1 favours short answers (VQA).")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option()] = None,
    top_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Nucleus mass when sampling.")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Nucleus sampling instead of beam search.")] = False,
    num_captions: Annotated[int, typer.Option(min=1, help="Texts per image.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line on stdout, nothing else.")] = False,
) -> None:
    """Caption images, or answer a prompt about them, with a BLIP-2 model."""
    from ..api import check_image, load
    from .progress import progress

    image_args, prompt = split_arguments(args)
    images = expand_images(image_args)
    for image in images:
        check_image(image)
    blip = load(model, device=device, dtype=dtype, llm=llm)
    settings = dict(num_beams=num_beams if num_beams is not None else (1 if sample else None),
                    max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, length_penalty=length_penalty,
                    repetition_penalty=repetition_penalty, top_p=top_p, sample=sample, num_captions=num_captions)
    used_prompt = prompt if prompt is not None else blip.decoding(**settings).prompt
    with progress("generating", total=len(images)) as advance:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            texts = blip.generate(batch, used_prompt, batch_size=batch_size, **settings)
            for image, text in zip(batch, texts):
                _emit(image, used_prompt, text, json_out)
            advance(len(batch))


def _emit(image: str, prompt: str, text, json_out: bool) -> None:
    if json_out:
        record = {"image": image, "prompt": prompt}
        record["texts" if isinstance(text, list) else "text"] = text
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    elif isinstance(text, list):
        sys.stdout.write(f"{image}:\n" + "".join(f"  {t}\n" for t in text))
    else:
        sys.stdout.write(f"{image}: {text}\n")
    sys.stdout.flush()
