"""``blip2 generate IMAGE... [PROMPT]``: captions or answers for images, as text or JSON lines."""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..runtime.errors import Blip2Error, PartialFailure
from ..images import MAX_PIXELS
from .options import BeamScoringOpt, DtypeOpt, JsonLinesOpt, LavisLlmOpt, emit

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

Job = tuple[str, Optional[str]]  # an image and its prompt (None: the model's recipe prompt)


def _glob_matches(arg: str) -> list[str]:
    return sorted(glob.glob(arg)) if glob.has_magic(arg) else []


def _is_image_arg(arg: str) -> bool:
    """An existing file or directory, a glob that matches something, or a name with an image suffix.

    A missing ``x.jpg`` counts as an image so that a typo is reported as a missing file, not used as a prompt.
    """
    return os.path.exists(arg) or bool(_glob_matches(arg)) or Path(arg).suffix.lower() in IMAGE_SUFFIXES


def split_arguments(args: list[str]) -> tuple[list[str], str | None]:
    """IMAGE... [PROMPT]: the last of several arguments is the prompt unless it names images."""
    if len(args) > 1 and not _is_image_arg(args[-1]):
        return args[:-1], args[-1]
    return args, None


def expand_images(args: list[str]) -> list[str]:
    """Files as given, directories as their image files (sorted), globs as their matches (sorted).

    A missing file, a glob matching nothing or a directory without images is a one-line error.
    """
    images: list[str] = []
    for arg in args:
        if os.path.isdir(arg):
            found = sorted(str(p) for p in Path(arg).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise Blip2Error(f"{arg}: directory holds no image files")
            images += found
        elif os.path.exists(arg):
            images.append(arg)
        elif glob.has_magic(arg):
            found = _glob_matches(arg)
            if not found:
                raise Blip2Error(f"{arg}: no files match")
            images += found
        else:
            raise Blip2Error(f"{arg}: no such file")
    return images


def read_prompt_file(path: str) -> list[str]:
    """One prompt per line (a final newline ends the last line; it does not start another)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Blip2Error(f"{path}: no such file") from None
    except (OSError, UnicodeError) as e:
        raise Blip2Error(f"{path}: cannot read prompts ({str(e).splitlines()[0]})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def plan(args: list[str], prompt: str | None, prompt_file: str | None) -> list[Job]:
    """Each image to caption with its prompt, from the arguments, ``--prompt`` or ``--prompt-file``."""
    if prompt is not None and prompt_file is not None:
        raise Blip2Error("give --prompt or --prompt-file, not both")
    option = "--prompt" if prompt is not None else "--prompt-file" if prompt_file is not None else None
    image_args, positional = split_arguments(args)
    if option is None:
        return [(image, positional) for image in expand_images(image_args)]
    if positional is not None:
        raise Blip2Error(f"two prompts: {positional!r} as the last argument and {option}; give one "
                         f"(with {option}, every argument is an image, directory or glob)")
    images = expand_images(args)
    if prompt_file is None:
        return [(image, prompt) for image in images]
    prompts = read_prompt_file(prompt_file)
    if len(prompts) != len(images):
        raise Blip2Error(f"{prompt_file}: {_count(len(prompts), 'prompt')} for {_count(len(images), 'image')}; "
                         "give one line per image, in order")
    return list(zip(images, prompts))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


class Skips:
    """Unreadable images: each reported on stderr as one line when it is met, then counted."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, image: object, error: Blip2Error) -> None:
        print(f"error: {error}", file=sys.stderr, flush=True)
        self.count += 1


def generate(
    args: Annotated[list[str], typer.Argument(
        metavar="IMAGE... [PROMPT]",
        help="Image files, directories or globs, then an optional prompt: the last argument is the prompt "
             "unless it is an existing file or directory, a glob that matches, or a name with an image suffix.")],
    prompt: Annotated[Optional[str], typer.Option(
        help="The prompt for every image; every argument is then an image, directory or glob.")] = None,
    prompt_file: Annotated[Optional[str], typer.Option(
        help="A UTF-8 file with one prompt per line: one line per image, in order.")] = None,
    model: Annotated[str, typer.Option(
        help="Registry name (see blip2 models), Hugging Face id or directory, LAVIS .pth, or run directory. "
             "The default is a download of about 15 GB on first use.")] = "blip2-opt-2.7b",
    llm: LavisLlmOpt = None,
    num_beams: Annotated[Optional[int], typer.Option(
        min=1, help="Beam width (default: the model's recipe; 1 with --sample).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        min=1, help="The most tokens to generate per text (default: the model's recipe).")] = None,
    min_new_tokens: Annotated[Optional[int], typer.Option(
        min=0, help="The fewest tokens to generate before a text may end (default: the model's recipe).")] = None,
    length_penalty: Annotated[Optional[float], typer.Option(
        help="Beam length penalty; -1 favours short answers (VQA).")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(
        help="Above 1 discourages repeating tokens already generated; 1 is off (default: the model's recipe).")] = None,
    beam_scoring: BeamScoringOpt = None,
    top_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Nucleus mass when sampling.")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Nucleus sampling instead of beam search.")] = False,
    seed: Annotated[Optional[int], typer.Option(
        help="Sampling seed: each text is drawn from (seed, its image's place, its index), whatever the batch.")] = None,
    num_captions: Annotated[int, typer.Option(min=1, help="Texts per image.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    dtype: DtypeOpt = "auto",
    max_pixels: Annotated[int, typer.Option(
        min=1, help="Refuse images with more pixels than this, from their header, before decoding "
                    "(the limit of every blip2 command).")] = MAX_PIXELS,
    exif_transpose: Annotated[bool, typer.Option(
        help="Turn images upright by their EXIF orientation, as image viewers show them; "
             "--no-exif-transpose uses the pixels as stored, as LAVIS and blip2 eval do.")] = True,
    json_out: JsonLinesOpt = False,
) -> None:
    """Caption images, or answer a prompt about them, with a BLIP-2 model.

    An unreadable image (or one over --max-pixels) is named on stderr and skipped.
    The others are still captioned, and the exit code is then 3.

    \bExamples:
    blip2 generate photo.jpg
    blip2 generate photo.jpg "Question: what is on the table? Short answer:"
    blip2 generate a.jpg b.jpg --prompt "Question: how many people are there? Short answer:"
    blip2 generate photos/ --json > captions.jsonl
    blip2 generate photos/ --prompt-file questions.txt --json
    """
    from ..api import load
    from ..runtime.progress import progress

    skips = Skips()
    jobs = [job for job in plan(args, prompt, prompt_file) if _header_ok(job[0], max_pixels, skips)]
    if not jobs:
        raise Blip2Error("")  # every image was reported already
    blip = load(model, device=device, dtype=dtype, llm=llm, max_pixels=max_pixels, exif_transpose=exif_transpose)
    overrides = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                     length_penalty=length_penalty, repetition_penalty=repetition_penalty, top_p=top_p,
                     sample=True if sample else None, num_captions=num_captions,
                     beam_scoring=beam_scoring.value if beam_scoring else None,
                     seed=seed)
    default_prompt = blip.decoding(**overrides).prompt
    jobs = [(image, default_prompt if p is None else p) for image, p in jobs]
    written = 0
    with progress("generating", total=len(jobs)) as advance:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            texts = blip.generate([image for image, _ in batch], [p for _, p in batch], batch_size=batch_size,
                                  on_error=skips, **overrides)
            for (image, used_prompt), text in zip(batch, texts):
                if text is not None:
                    show(image, used_prompt, text, json_out)
                    written += 1
            advance(len(batch))
    if not written:
        raise Blip2Error("")
    if skips.count:
        raise PartialFailure("")


def _header_ok(image: str, max_pixels: int, skips: Skips) -> bool:
    """Whether the image is a regular file with a header Pillow recognises and at most ``max_pixels``
    pixels (nothing is decoded); any other file is reported and skipped."""
    from ..images import TooManyPixels, check_header

    try:
        check_header(image, max_pixels=max_pixels)
    except TooManyPixels as e:
        skips(image, Blip2Error(f"{e}; --max-pixels raises the limit"))
        return False
    except Blip2Error as e:
        skips(image, e)
        return False
    return True


def show(image: str, prompt: str, text: str | list[str], json_out: bool) -> None:
    """One image's text (or texts): a JSON line, or ``IMAGE: TEXT`` (several texts indented below the image)."""
    record = {"image": image, "prompt": prompt}
    record["texts" if isinstance(text, list) else "text"] = text
    emit(record, json_out, render_texts, ensure_ascii=False)


def render_texts(record: dict) -> None:
    if "texts" in record:
        sys.stdout.write(f"{record['image']}:\n" + "".join(f"  {t}\n" for t in record["texts"]))
    else:
        sys.stdout.write(f"{record['image']}: {record['text']}\n")
