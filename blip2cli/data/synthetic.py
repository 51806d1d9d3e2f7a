"""A built-in synthetic dataset for the CPU "tiny" pipeline: one coloured shape on a plain grey background.

Captions are ``"a <colour> <shape>"``. Item ``i`` of a split always shows combination ``i % 12`` (so
every colour and shape pair appears in both splits) and is rendered from a random stream seeded by
(split, seed, i): the held-out split shows new renderings of the combinations seen in training.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..models.tiny import COLOURS, SHAPES

SPLITS = ("train", "heldout")

RGB = {"red": (215, 35, 35), "green": (35, 175, 45), "blue": (40, 60, 215), "yellow": (230, 205, 35)}
_JITTER = 15  # per channel, on the shape colour
_GREY_JITTER = 6  # per channel, on the background grey: it stays far from every saturated shape colour


def caption(colour: str, shape: str) -> str:
    """The caption of a rendering: ``caption("red", "circle") == "a red circle"``."""
    return f"a {colour} {shape}"


def _background(rng: random.Random) -> tuple[int, int, int]:
    level = rng.randint(170, 230) if rng.random() < 0.5 else rng.randint(25, 85)
    return tuple(level + rng.randint(-_GREY_JITTER, _GREY_JITTER) for _ in range(3))


def render_shape(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    """A ``size`` x ``size`` RGB image of one filled ``shape`` in ``colour``, at a random place and scale
    (35-80% of the side), on a light or dark grey background. Drawn without anti-aliasing, so every
    pixel is either background or shape colour."""
    if colour not in RGB:
        raise ValueError(f"unknown colour {colour!r}: expected one of {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")
    image = Image.new("RGB", (size, size), _background(rng))
    _draw_shape(ImageDraw.Draw(image), colour, shape, (0, 0), size, rng)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, colour: str, shape: str, origin: tuple[int, int], size: int,
                rng: random.Random) -> None:
    """One filled shape at a random place and scale within the ``size`` x ``size`` square at ``origin``."""
    fill = tuple(min(255, max(0, v + rng.randint(-_JITTER, _JITTER))) for v in RGB[colour])
    side = max(2, round(size * rng.uniform(0.35, 0.8)))
    x0, y0 = origin[0] + rng.randint(0, size - side), origin[1] + rng.randint(0, size - side)
    x1, y1 = x0 + side - 1, y0 + side - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


class ShapesDataset(Dataset):
    """``size`` renderings of the 12 colour/shape pairs; item ``i`` is deterministic in (split, seed, i).

    Items are ``{"image", "text", "colour", "shape", "image_id"}``; ``image`` is ``transform(PIL image)``,
    or the PIL image itself when ``transform`` is None.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 1000,
        image_size: int = 64,
        seed: int = 0,
        transform: Callable[[Image.Image], Any] | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected 'train' or 'heldout'")
        self.split, self.size, self.image_size, self.seed, self.transform = split, size, image_size, seed, transform

    def __len__(self) -> int:
        return self.size

    def combination(self, i: int) -> tuple[str, str]:
        """The (colour, shape) of item ``i``."""
        colour, shape = divmod(i % (len(COLOURS) * len(SHAPES)), len(SHAPES))
        return COLOURS[colour], SHAPES[shape]

    def render(self, i: int) -> Image.Image:
        """Item ``i``'s image, untransformed."""
        # a string seed: Python hashes it with SHA-512, so the stream is the same in every process
        rng = random.Random(f"shapes:{self.split}:{self.seed}:{i}")
        return render_shape(*self.combination(i), self.image_size, rng)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for a dataset of {self.size}")
        colour, shape = self.combination(i)
        image = self.render(i)
        return {
            "image": self.transform(image) if self.transform else image,
            "text": caption(colour, shape),
            "colour": colour,
            "shape": shape,
            "image_id": i,
        }

    def write_images(self, directory: str | Path, n: int | None = None) -> list[Path]:
        """Save the first ``n`` items (all by default) as PNGs in ``directory``, with ``annotations.json``
        beside them: a LAVIS-style list of ``{"image", "caption", "image_id"}`` (``CaptionJsonDataset``
        reads it). Returns the image paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        n = self.size if n is None else min(n, self.size)
        paths, annotations = [], []
        for i in range(n):
            path = directory / f"{self.split}_{i:05d}.png"
            self.render(i).save(path)
            paths.append(path)
            annotations.append({"image": path.name, "caption": caption(*self.combination(i)), "image_id": i})
        (directory / "annotations.json").write_text(json.dumps(annotations, indent=1) + "\n")
        return paths


def write_samples(run_dir: str | Path, image_size: int, n: int = 12, seed: int = 0) -> Path:
    """Held-out shapes (one per colour and shape) in ``run_dir/samples/`` with their true captions, for trying a
    model trained on the shapes set; returns the directory."""
    directory = Path(run_dir) / "samples"
    ShapesDataset("heldout", size=n, image_size=max(64, image_size), seed=seed).write_images(directory)
    return directory


def question_about(rng: random.Random, first: tuple[str, str], second: tuple[str, str]) -> tuple[str, str]:
    """A question about one of two (colour, shape) pairs that only the image answers, and its answer, the caption of
    that shape (the language the tiny LLM speaks): the colour of a shape ("what colour is the circle ?" -> "a red
    circle") or the shape of a colour ("what is the red shape ?" -> "a red circle")."""
    colour, shape = rng.choice([first, second])
    question = f"what colour is the {shape} ?" if rng.random() < 0.5 else f"what is the {colour} shape ?"
    return question, caption(colour, shape)


class ShapesQADataset(Dataset):
    """Visual questions on two shapes per image (different colours, different kinds, side by side); whether the
    colour or the kind is asked, and of which shape, is drawn per item, so the question decides the answer.

    Items are ``{"image", "question", "answers", "weights", "question_id", "image_id"}`` (one answer of weight 1);
    deterministic in (split, seed, i) like ``ShapesDataset``.
    """

    def __init__(self, split: str = "train", size: int = 1000, image_size: int = 64, seed: int = 0,
                 transform: Callable[[Image.Image], Any] | None = None):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected 'train' or 'heldout'")
        self.split, self.size, self.image_size, self.seed, self.transform = split, size, image_size, seed, transform

    def __len__(self) -> int:
        return self.size

    def example(self, i: int) -> tuple[Image.Image, str, str]:
        """Item ``i``'s image (untransformed), question and answer."""
        rng = random.Random(f"shapes-qa:{self.split}:{self.seed}:{i}")
        colours, shapes = rng.sample(COLOURS, 2), rng.sample(SHAPES, 2)
        size, half = self.image_size, self.image_size // 2
        image = Image.new("RGB", (size, size), _background(rng))
        draw = ImageDraw.Draw(image)
        for k in range(2):  # each shape in its own half (left, right), so they never overlap
            _draw_shape(draw, colours[k], shapes[k], (k * half, rng.randint(0, size - half)), half, rng)
        question, answer = question_about(rng, (colours[0], shapes[0]), (colours[1], shapes[1]))
        return image, question, answer

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for a dataset of {self.size}")
        image, question, answer = self.example(i)
        return {"image": self.transform(image) if self.transform else image, "question": question,
                "answers": [answer], "weights": [1.0], "question_id": i, "image_id": i}

    def write_vqa(self, directory: str | Path) -> tuple[Path, Path]:
        """Every item laid out as VQAv2's val2014 split, for ``blip2 eval vqav2 --images DIRECTORY``: images as
        ``val2014/COCO_val2014_<id>.jpg``, ``questions.json`` and ``annotations.json`` in the official layouts (ten
        identical answers). Returns the two files."""
        directory = Path(directory)
        (directory / "val2014").mkdir(parents=True, exist_ok=True)
        questions, annotations = [], []
        for i in range(self.size):
            image, question, answer = self.example(i)
            image.save(directory / "val2014" / f"COCO_val2014_{i:012d}.jpg", quality=95)
            questions.append({"image_id": i, "question": question, "question_id": i})
            annotations.append({"question_id": i, "image_id": i, "answer_type": "other", "question_type": "what",
                                "answers": [{"answer": answer, "answer_id": k + 1} for k in range(10)]})
        (directory / "questions.json").write_text(json.dumps({"questions": questions}) + "\n")
        (directory / "annotations.json").write_text(json.dumps({"annotations": annotations}) + "\n")
        return directory / "questions.json", directory / "annotations.json"
