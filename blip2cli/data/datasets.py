"""Pretraining data: caption annotation files, webdataset shards, a resumable weighted mixture, collation."""

from __future__ import annotations

import bisect
import collections
import glob
import itertools
import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..runtime.errors import Blip2Error
from ..runtime.extras import import_extra
from ..runtime.io import read_json
from ..images import ImageError, open_rgb
from .text import pre_caption, pre_question

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

Transform = Callable[[Image.Image], Any]


# --- annotation files -----------------------------------------------------------------------------


def _read_annotations(path: Path) -> list[tuple[str, str | list[str], Any]]:
    """(image path, caption or captions, image id) per entry of a LAVIS list or a COCO captions file."""
    data = read_json(path, "annotation file")
    if isinstance(data, list):
        entries = []
        for i, item in enumerate(data):
            if not isinstance(item, dict) or "image" not in item or "caption" not in item:
                raise Blip2Error(f"{path}: entry {i} lacks 'image' or 'caption'")
            entries.append((item["image"], item["caption"], item.get("image_id", i)))
    elif isinstance(data, dict) and "images" in data and "annotations" in data:
        files = {image["id"]: image["file_name"] for image in data["images"]}
        entries = []
        for i, ann in enumerate(data["annotations"]):
            if ann.get("image_id") not in files or "caption" not in ann:
                raise Blip2Error(f"{path}: annotation {i} has no caption or an image_id missing from 'images'")
            entries.append((files[ann["image_id"]], ann["caption"], ann["image_id"]))
    else:
        raise Blip2Error(f"{path}: expected a list of {{image, caption}} or a COCO file ('images', 'annotations')")
    for i, (_, captions, _) in enumerate(entries):
        if isinstance(captions, list):
            if not captions or not all(isinstance(c, str) for c in captions):
                raise Blip2Error(f"{path}: entry {i} has an empty or non-text caption list")
        elif not isinstance(captions, str):
            raise Blip2Error(f"{path}: entry {i} has a caption that is not text")
    return entries


class CaptionJsonDataset(Dataset):
    """Image-caption pairs from a LAVIS annotation list (``[{"image", "caption", "image_id"?}]``, paths
    relative to ``image_root``) or a COCO captions file (one item per annotation).

    Items are ``{"image": transform(PIL image), "text": pre_caption(caption), "image_id"}``. An entry whose
    caption is a list yields one of them, chosen from (``seed``, index, epoch): call ``set_epoch`` each
    epoch for a new choice. An image that is missing or unreadable is skipped: the item is the next
    readable entry's (wrapping round), the entry is remembered and not opened again, and ``skipped``
    counts such entries (per process: DataLoader workers each keep their own count).
    """

    def __init__(
        self,
        ann_path: str | Path,
        image_root: str | Path,
        transform: Transform | None = None,
        max_words: int = 50,
        prompt: str = "",
        seed: int = 0,
    ):
        self.ann_path = Path(ann_path)
        self.image_root = Path(image_root)
        self.entries = _read_annotations(self.ann_path)
        self.transform, self.max_words, self.prompt, self.seed = transform, max_words, prompt, seed
        self.epoch = 0
        self.skipped = 0
        self._unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        j, image = first_readable(self, index, lambda entry: entry[0])
        _, captions, image_id = self.entries[j]
        if isinstance(captions, list):
            captions = random.Random(f"caption:{self.seed}:{j}:{self.epoch}").choice(captions)
        return {
            "image": self.transform(image) if self.transform else image,
            "text": pre_caption(captions, self.max_words, self.prompt),
            "image_id": image_id,
        }


def first_readable(dataset: Any, index: int, image_of: Callable[[Any], str]) -> tuple[int, Image.Image]:
    """The entry at ``index`` of an annotation dataset, or the next readable one (wrapping round), and its image.

    ``dataset`` has ``entries``, ``image_root``, ``ann_path``, a set ``_unreadable`` and a count ``skipped``: an
    unreadable entry is remembered (never opened again), counted and logged.
    """
    n = len(dataset.entries)
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range for {n} entries")
    for j in ((index + step) % n for step in range(n)):
        if j in dataset._unreadable:
            continue
        try:
            return j, open_rgb(dataset.image_root / image_of(dataset.entries[j]))
        except ImageError as e:
            dataset._unreadable.add(j)
            dataset.skipped += 1
            log.warning("skipping unreadable image: %s", e)
    raise Blip2Error(f"{dataset.ann_path}: no readable image under {dataset.image_root}")


def answer_weights(answers: str | list[str]) -> tuple[list[str], list[float]]:
    """Each distinct answer with its share of the annotators' answers (BLIP's VQA targets): ten answers
    ``["2"] * 6 + ["3"] * 4`` give ``(["2", "3"], [0.6, 0.4])``; one answer (Visual Genome, GQA) weighs 1."""
    answers = [answers] if isinstance(answers, str) else answers
    counts = collections.Counter(answers)
    return list(counts), [n / len(answers) for n in counts.values()]


class VqaJsonDataset(Dataset):
    """Questions on images from a LAVIS VQA training list (``[{"image", "question", "answer"}]``: VQAv2's
    ``vqa_train.json``/``vqa_val.json``, Visual Genome's ``vg_qa.json``, OK-VQA, GQA), image paths relative to
    ``image_root``.

    Items are ``{"image", "question", "answers", "weights", "image_id"}``: the question cleaned as LAVIS cleans it
    (``pre_question``), each distinct answer with its share (``answer_weights``). An unreadable image is skipped
    as in ``CaptionJsonDataset``.
    """

    def __init__(self, ann_path: str | Path, image_root: str | Path, transform: Transform | None = None,
                 max_words: int = 50):
        self.ann_path, self.image_root = Path(ann_path), Path(image_root)
        data = read_json(self.ann_path, "VQA annotation file")
        if not isinstance(data, list) or not all(isinstance(e, dict) and {"image", "question", "answer"} <= set(e)
                                                 for e in data):
            raise Blip2Error(f"{self.ann_path}: expected a list of {{image, question, answer}} (LAVIS's VQA layout)")
        if not data:
            raise Blip2Error(f"{self.ann_path}: no questions")
        self.entries = data
        self.transform, self.max_words = transform, max_words
        self.skipped = 0
        self._unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        j, image = first_readable(self, index, lambda entry: entry["image"])
        entry = self.entries[j]
        answers, weights = answer_weights(entry["answer"])
        return {"image": self.transform(image) if self.transform else image,
                "question": pre_question(entry["question"], self.max_words), "answers": answers,
                "weights": weights, "image_id": entry.get("image_id", entry["image"])}


# --- webdataset shards ----------------------------------------------------------------------------


def expand_shards(urls: Sequence[str] | str) -> list[str]:
    """Shard list: brace patterns expanded (``shards/{00000..00099}.tar``), globs matched, a directory ->
    its ``*.tar``; a local shard that does not exist is an error."""
    if isinstance(urls, (str, Path)):
        urls = [str(urls)]
    shards: list[str] = []
    for url in urls:
        url = str(url)
        if Path(url).is_dir():
            shards.extend(sorted(str(p) for p in Path(url).glob("*.tar")))
            continue
        for pattern in _webdataset().shardlists.expand_urls(url):
            local = "://" not in pattern and not pattern.startswith("pipe:")
            shards.extend(sorted(glob.glob(pattern)) if local and glob.has_magic(pattern) else [pattern])
    for shard in shards:
        local = "://" not in shard and not shard.startswith("pipe:")
        if local and not Path(shard).is_file():
            raise Blip2Error(f"shard not found: {shard}")
    if not shards:
        raise Blip2Error(f"no .tar shards found in {', '.join(map(str, urls))}")
    return shards


def _webdataset():
    """The ``webdataset`` library (training and data preparation read shards with it: their extras install it)."""
    return import_extra("webdataset", "train", "reading webdataset shards")


class WebDatasetSamples(IterableDataset):
    """Image-caption samples from webdataset shards as img2dataset writes them; see ``webdataset_samples``."""

    def __init__(
        self,
        urls: Sequence[str] | str,
        transform: Transform | None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_words: int = 50,
        shuffle: int = 1000,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.urls = expand_shards(urls)
        self.shards = self.urls[rank::world_size]
        if not self.shards:
            raise Blip2Error(f"{len(self.urls)} shards cannot feed {world_size} ranks: rank {rank} has none")
        self.transform, self.seed, self.rank, self.max_words, self.shuffle = transform, seed, rank, max_words, shuffle
        self.epoch = 0
        # per process: with DataLoader workers each worker counts its own samples
        self.stats = {"seen": 0, "skipped": 0, "errors": 0}

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch: it seeds the shard order, the shuffle buffer and the CapFilt caption picks."""
        self.epoch = epoch

    def worker_shards(self) -> list[str]:
        """This rank's shards in this epoch's order, restricted to the calling DataLoader worker."""
        shards = list(self.shards)
        random.Random(f"shards:{self.seed}:{self.epoch}:{self.rank}").shuffle(shards)
        info = get_worker_info()
        return shards[info.id :: info.num_workers] if info else shards

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        wds = _webdataset()
        samples = wds.tarfile_samples([{"url": url} for url in self.worker_shards()], handler=self._on_error)
        if self.shuffle > 1:
            rng = random.Random(f"buffer:{self.seed}:{self.epoch}:{self.rank}:{worker}")
            samples = wds.shuffle(self.shuffle, initial=self.shuffle, rng=rng)(samples)
        for raw in samples:
            self.stats["seen"] += 1
            sample = self._decode(raw)
            if sample is None:
                self.stats["skipped"] += 1
                continue
            yield sample

    def _on_error(self, exn: Exception) -> bool:
        # an unreadable shard or tar member: count it and go on with the next
        self.stats["errors"] += 1
        log.warning("webdataset read error: %s", exn)
        return True

    def _caption(self, raw: dict[str, Any]) -> str:
        meta = sample_meta(raw)
        # CapFilt output: {"captions": [{"text", "score"}, ...]} (LAVIS also writes a bare list)
        captions = meta if isinstance(meta, list) else meta.get("captions") if isinstance(meta, dict) else None
        if isinstance(captions, list):
            texts = [c.get("text") if isinstance(c, dict) else c for c in captions]
            texts = [t for t in texts if isinstance(t, str) and t.strip()]
            if texts:
                rng = random.Random(f"capfilt:{self.seed}:{self.epoch}:{raw['__key__']}")
                return pre_caption(rng.choice(texts), self.max_words)
        text = web_caption(raw, meta)
        return pre_caption(text, self.max_words) if text else ""

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        text = self._caption(raw)
        image = decode_image(raw) if text else None
        if image is None:
            log.debug("skipping %s: no decodable image or no caption", raw.get("__key__"))
            return None
        return {"image": self.transform(image) if self.transform else image, "text": text, "key": raw["__key__"]}


def sample_meta(raw: dict[str, Any]) -> Any:
    """A webdataset sample's ``json`` member, parsed; ``{}`` when absent or unreadable."""
    try:
        return json.loads(raw["json"]) if "json" in raw else {}
    except (ValueError, UnicodeDecodeError):
        return {}


def web_caption(raw: dict[str, Any], meta: Any = None) -> str:
    """A sample's own caption: its ``txt`` member, else the json ``"caption"``; ``""`` when it has none."""
    if "txt" in raw:
        try:
            return raw["txt"].decode("utf-8")
        except UnicodeDecodeError:
            pass
    meta = sample_meta(raw) if meta is None else meta
    return meta["caption"] if isinstance(meta, dict) and isinstance(meta.get("caption"), str) else ""


def decode_image(raw: dict[str, Any]) -> Image.Image | None:
    """A sample's image member as RGB; ``None`` when it has none, it does not decode or it has more than
    ``MAX_PIXELS`` pixels (see ``blip2cli.images``)."""
    ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if ext is None:
        return None
    try:
        return open_rgb(raw[ext], name=f"{raw.get('__key__')}.{ext}")
    except ImageError as e:
        log.debug("undecodable image: %s", e)
        return None


def webdataset_samples(
    urls: Sequence[str] | str,
    transform: Transform | None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    max_words: int = 50,
    shuffle: int = 1000,
) -> WebDatasetSamples:
    """An IterableDataset of ``{"image", "text", "key"}`` from img2dataset shards (``jpg``/``png``/``webp``
    image, ``txt`` caption, ``json`` metadata per sample).

    ``urls``: shard paths, brace patterns, or a directory of ``.tar`` files. Shard ``i`` goes to rank
    ``i % world_size``; a rank's shards are shuffled per epoch (``set_epoch``) and split across
    DataLoader workers, then samples pass a seeded shuffle buffer of ``shuffle`` (1 or 0: none; pretraining
    passes its recipe's ``data.shuffle_buffer``). When the
    json has a CapFilt ``"captions"`` list, one of its texts is drawn per visit, seeded by (seed, epoch,
    key); otherwise the ``txt`` member (or json ``"caption"``) is the caption. Samples with no decodable
    image or no caption are skipped and counted in ``stats["skipped"]`` (``stats["seen"]`` counts all,
    ``stats["errors"]`` unreadable shards or members); nothing is raised.
    """
    return WebDatasetSamples(urls, transform, seed, rank, world_size, max_words, shuffle)


# --- mixture --------------------------------------------------------------------------------------


class _MapCursor:
    """Walks a map-style source in a fresh seeded permutation each epoch."""

    shared = True  # its position is the global count of draws, so every worker can follow it cheaply

    def __init__(self, source: Any, key: str):
        self.source, self.key, self.count = source, key, 0
        self._epoch, self._order = -1, []

    def skip(self) -> None:
        self.count += 1

    def draw(self) -> Any:
        epoch, offset = divmod(self.count, len(self.source))
        if epoch != self._epoch:
            self._order = list(range(len(self.source)))
            random.Random(f"{self.key}:{epoch}").shuffle(self._order)
            self._epoch = epoch
            if hasattr(self.source, "set_epoch"):
                self.source.set_epoch(epoch)
        self.count += 1
        return self.source[self._order[offset]]


class _IterCursor:
    """Walks an iterable source, restarting it with the next epoch when it runs out."""

    shared = False  # each process (worker) draws from its own copy

    def __init__(self, source: Any, index: int):
        self.source, self.index, self.epoch, self._it = source, index, -1, None

    def _restart(self) -> None:
        self.epoch += 1
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(self.epoch)
        self._it = iter(self.source)

    def draw(self) -> Any:
        if self._it is not None:
            try:
                return next(self._it)
            except StopIteration:
                pass
        self._restart()
        try:
            return next(self._it)
        except StopIteration:
            raise Blip2Error(f"mixture source {self.index} yielded no samples in epoch {self.epoch}") from None

    skip = draw


def _is_map_style(source: Any) -> bool:
    return not isinstance(source, IterableDataset) and hasattr(source, "__len__") and hasattr(source, "__getitem__")


class Mixture(IterableDataset):
    """An endless weighted mixture of datasets, resumable exactly.

    Each sample's source is drawn with ``random.Random(seed)`` in proportion to the (normalised)
    ``weights``. Map-style sources are read in a new seeded permutation each epoch; iterable sources are
    restarted with the next epoch (``set_epoch`` is called on either kind when it has one) when they run
    out. The stream is a deterministic function of (seed, position) provided the iterable sources are
    deterministic given their epoch.

    ``state_dict()`` records ``position``, the number of samples yielded so far; after
    ``load_state_dict`` the next iteration replays the first ``position`` draws without yielding them:
    map-style sources only advance a counter, iterable sources are read and their samples discarded
    (affordable at this project's scale; the cost is that of reading them once).

    In DataLoader workers, positions are dealt in blocks of ``block_size``: block ``b`` belongs to
    worker ``b % num_workers``. With ``block_size`` equal to the loader's batch size, the loader's
    in-order round-robin over workers yields exactly the single-process stream for map-style sources
    (iterable sources give a stream that depends on the number of workers, each worker reading its own
    shards). ``position`` only advances in the process that iterates, so with workers the trainer sets
    ``mixture.position`` to the number of samples it consumed before calling ``state_dict``.
    """

    def __init__(self, sources: Sequence[Any], weights: Sequence[float] | None = None, seed: int = 0,
                 block_size: int = 1):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise ValueError(f"{len(weights)} weights for {len(sources)} sources")
        if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mixture weights must be non-negative with a positive sum, got {weights}")
        for i, source in enumerate(sources):
            if _is_map_style(source) and len(source) == 0:
                raise ValueError(f"mixture source {i} is empty")
        total = sum(weights)
        self.sources = list(sources)
        self.weights = [w / total for w in weights]
        self.seed, self.block_size = seed, block_size
        self.position = 0
        self._cumulative = list(itertools.accumulate(self.weights))

    def _choose(self, rng: random.Random) -> int:
        # zero-weight sources span an empty interval and are never drawn
        return min(bisect.bisect_right(self._cumulative, rng.random()), len(self.sources) - 1)

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        start = self.position
        rng = random.Random(self.seed)
        cursors = [
            _MapCursor(s, f"mixture:{self.seed}:{i}") if _is_map_style(s) else _IterCursor(s, i)
            for i, s in enumerate(self.sources)
        ]
        for position in itertools.count():
            cursor = cursors[self._choose(rng)]
            mine = (position // self.block_size) % workers == worker
            if mine and position >= start:
                sample = cursor.draw()
                self.position = position + 1
                yield sample
            elif mine or cursor.shared:
                cursor.skip()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "weights": list(self.weights), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state["position"]``; the seed and weights must be those the state was saved with."""
        if state.get("seed", self.seed) != self.seed:
            raise Blip2Error(f"data state was saved with seed {state['seed']}, this mixture has seed {self.seed}")
        saved = state.get("weights", self.weights)
        if len(saved) != len(self.weights) or any(abs(a - b) > 1e-9 for a, b in zip(saved, self.weights)):
            raise Blip2Error(f"data state was saved with mixture weights {saved}, this mixture has {self.weights}")
        self.position = int(state["position"])


# --- batching -------------------------------------------------------------------------------------


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch from sample dicts: tensor fields (``image``) stacked, the others (``text``, ``image_id``,
    ``key``) as lists. Only the fields every sample has are kept (mixtures mix sources with different
    extras)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    keys = [k for k in samples[0] if all(k in s for s in samples[1:])]
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
