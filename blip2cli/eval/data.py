"""Benchmark inputs from the official and LAVIS annotation files: what to run the model on."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data.text import pre_question
from ..runtime.errors import Blip2Error
from ..runtime.io import read_json
from .runner import Item

COCO_FILE = "COCO_{split}_{id:012d}.jpg"


@dataclass
class ZeroShot:
    """The paper's protocol for one benchmark (``zero_shot`` in ``recipes/eval/*.yaml``): the model
    of its table, the annotation files ``blip2 prepare`` writes, and the image root."""

    model: str = ""
    files: dict[str, str] = field(default_factory=dict)  # option (questions, annotations, items) -> path
    prepare: str = ""  # the command that writes ``files``
    images: str = ""  # the image root
    images_source: str = ""  # where the images come from: blip2 does not download them
    note: str = ""  # said with the scores

    def file(self, option: str) -> Path | None:
        """The protocol's file for ``--option`` (None if it names none); a missing one is a one-line error."""
        if option not in self.files:
            return None
        path = Path(self.files[option])
        if not path.is_file():
            raise Blip2Error(f"{path}: not found; `{self.prepare}` gets it (or give --{option} FILE)")
        return path

    def image_hint(self) -> str:
        return f"{self.images_source} (or give --images DIR)"


def check_image_root(root: Path, hint: str = "check --images") -> None:
    """The image root must be a directory: a missing one is a one-line error, before any model loads."""
    if not root.is_dir():
        raise Blip2Error(f"{root}: no such image directory; {hint}")


def check_some_images(paths: Sequence[Path], root: Path) -> None:
    """At least one benchmark image must be there: none at all means the wrong root, not a few bad files."""
    if paths and not any(Path(p).exists() for p in paths):
        raise Blip2Error(f"none of the {len(paths)} images is where the annotations put it under {root} "
                         f"(the first: {paths[0]}: no such image); check --images")


def unreadable_images(paths: Sequence[Path]) -> list[str]:
    """``PATH: reason`` for every image that cannot be decoded, each path once."""
    from ..images import open_rgb

    bad = []
    for path in dict.fromkeys(paths):
        try:
            open_rgb(path)
        except Blip2Error as e:
            bad.append(str(e))
    return bad


def _image(root: Path, name: str) -> Path:
    return root / name


def vqa_items(questions: Path, image_root: Path, coco_split: str = "val2014") -> list[Item]:
    """VQA questions: the official ``{"questions": [{image_id, question, question_id}]}`` file (COCO
    file names under ``image_root``/``coco_split``) or a LAVIS list ``[{image, question, question_id}]``. Each
    question is cleaned as LAVIS's evaluation cleans it (``pre_question``)."""
    data = read_json(questions, "questions file", hint="the official VQA files are at visualqa.org/download.html")
    if isinstance(data, dict) and "questions" in data:
        return [Item(q["question_id"], _image(image_root, f"{coco_split}/" + COCO_FILE.format(split=coco_split,
                                                                                          id=q["image_id"])),
                     pre_question(q["question"])) for q in data["questions"]]
    if isinstance(data, list) and all(isinstance(q, dict) and {"image", "question", "question_id"} <= set(q)
                                      for q in data):
        return [Item(q["question_id"], _image(image_root, q["image"]), pre_question(q["question"])) for q in data]
    raise Blip2Error(f"{questions}: expected the official VQA questions file or a list of "
                     "{image, question, question_id}")


def gqa_items(questions: Path, image_root: Path) -> list[Item]:
    """GQA questions: the official ``{id: {imageId, question, answer}}`` file or a LAVIS list."""
    data = read_json(questions, "GQA questions file", hint="download testdev_balanced_questions.json from the GQA site")
    if isinstance(data, dict):
        return [Item(qid, _image(image_root, f"{q['imageId']}.jpg"), pre_question(q["question"]))
                for qid, q in data.items()]
    if isinstance(data, list):
        return [Item(q["question_id"], _image(image_root, q["image"]), pre_question(q["question"])) for q in data]
    raise Blip2Error(f"{questions}: expected GQA questions as a mapping or a list")


def _coco_id(name: str) -> int:
    """LAVIS derives COCO image ids from file names: ``.../COCO_val2014_000000391895.jpg`` -> 391895."""
    match = re.search(r"_(\d+)\.\w+$", name)
    if match is None:
        raise Blip2Error(f"cannot read a COCO image id from {name!r}")
    return int(match.group(1))


def caption_items(annotations: Path | None, image_root: Path, items_file: Path | None = None) -> list[Item]:
    """Images to caption: from ``items_file`` (a LAVIS list of ``{image, img_id?}``, e.g. the Karpathy
    test split or nocaps_val.json) or else from the reference file's ``images`` (``id``, ``file_name``)."""
    if items_file is not None:
        data = read_json(items_file, "image list")
        if not isinstance(data, list):
            raise Blip2Error(f"{items_file}: expected a list of {{image, ...}}")
        seen, items = set(), []
        for entry in data:
            image_id = entry.get("img_id", entry.get("image_id"))
            image_id = _coco_id(entry["image"]) if image_id is None or isinstance(image_id, str) else image_id
            if image_id not in seen:
                seen.add(image_id)
                items.append(Item(image_id, _image(image_root, entry["image"])))
        return items
    data = read_json(annotations, "reference captions file")
    images = data.get("images") if isinstance(data, dict) else None
    if not images or not all("file_name" in im for im in images):
        raise Blip2Error(f"{annotations}: its images have no file_name; give the image list with --items")
    return [Item(im["id"], _image(image_root, im["file_name"])) for im in images]


def retrieval_items(annotations: Path, image_root: Path, max_words: int = 50):
    """A LAVIS retrieval split (``[{image, caption: [..]}]``, e.g. flickr30k_test.json,
    coco_karpathy_test.json): image paths, cleaned texts, and the ground truth in both directions."""
    from ..data.text import pre_caption

    data = read_json(annotations, "retrieval annotation file",
                     "LAVIS's flickr30k_test.json / coco_karpathy_test.json list each image with its captions")
    if not isinstance(data, list) or not all(isinstance(d, dict) and "image" in d and "caption" in d for d in data):
        raise Blip2Error(f"{annotations}: expected a list of {{image, caption: [...]}}")
    images, texts, img2txt, txt2img = [], [], [], []
    for i, entry in enumerate(data):
        images.append(image_root / entry["image"])
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        img2txt.append(list(range(len(texts), len(texts) + len(captions))))
        for caption in captions:
            texts.append(pre_caption(caption, max_words))
            txt2img.append(i)
    return images, texts, img2txt, txt2img
