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
    fill = tuple(min(255, max(0, v + rng.randint(-_JITTER, _JITTER))) for v in RGB[colour])
    side = max(2, round(size * rng.uniform(0.35, 0.8)))
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    x1, y1 = x0 + side - 1, y0 + side - 1
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


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
