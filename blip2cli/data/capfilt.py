"""CapFilt as BLIP-2 used it, over webdataset shards: a BLIP captioner samples captions for each web image, CLIP
ranks them together with the web caption by image-text cosine similarity, and the top ones are kept with their
scores (the models: ``blip2cli.models.capfilt_captioner`` and ``blip2cli.models.clip_ranker``).

Each caption is sampled from a seed hashed from (seed, sample key, caption index), so the captions of an image do
not depend on the batch it is in or on the number of processes. Output shards carry every input member unchanged,
with the kept captions added to the json as ``"captions": [{"text", "score", "source"}]``; the pretraining loader
draws one of them per visit. Finished shards are skipped on a rerun.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import checked, from_dict, read_yaml, recipe_path
from ..models.capfilt_captioner import Captioner, blip_pixels
from ..models.clip_ranker import Ranker
from ..models.decoding import Decoding, flat_key, holds_decoding
from ..models.sampling import row_seed
from ..runtime import dist
from ..runtime.devices import rank_device, resolve_dtype
from ..runtime.errors import Blip2Error
from ..runtime.extras import import_extra, require_extra
from ..runtime.io import atomic_path, atomic_write_text
from ..runtime.progress import progress, quiet_transformers
from .datasets import decode_image, expand_shards, sample_meta, web_caption

RECIPE = "prepare/capfilt"


def shipped_decoding() -> Decoding:
    """The decoding of the shipped recipe (``recipes/prepare/capfilt.yaml``): BLIP's sampling call, as the paper
    ran it. A ``CapFiltRecipe`` made without a ``decoding`` starts from it."""
    return from_dict(Decoding, read_yaml(recipe_path(RECIPE)).get("decoding", {}), f"{RECIPE}.decoding")


@holds_decoding
@dataclass
class CapFiltRecipe:
    """Models and decoding of ``blip2 prepare capfilt`` (``recipes/prepare/capfilt.yaml``)."""

    captioner: str  # registry name, hub id or directory of a BLIP captioning model
    ranker: str  # registry name, hub id, directory or open_clip MODEL/TAG of a CLIP model
    keep: int = checked(ge=1)  # the best captions kept per image, the web caption among the candidates
    batch_size: int = checked(ge=1)  # images per batch
    workers: int = checked(ge=0)  # image-decoding processes per rank
    seed: int  # the sampling seed
    # how captions are sampled (nucleus sampling, one beam): prompt, num_captions, top_p, top_k, the lengths
    # (max_length and min_length count the prompt's tokens, as BLIP does) and repetition_penalty
    decoding: Decoding = field(default_factory=shipped_decoding)
    # the flat keys of recipes written before ``decoding:`` (and ``--set max_length=20``): fields of ``decoding``
    prompt: str | None = flat_key()
    num_captions: int | None = flat_key()
    top_p: float | None = flat_key()
    top_k: int | None = flat_key()
    max_length: int | None = flat_key()
    min_length: int | None = flat_key()
    repetition_penalty: float | None = flat_key()


# --- shards -------------------------------------------------------------------------------------------


def read_samples(path: Path) -> Iterator[dict[str, Any]]:
    """The samples of a webdataset tar in order: ``{"__key__": key, ext: bytes, ...}``."""
    wds = import_extra("webdataset", "data", "reading webdataset shards")
    for sample in wds.tariterators.tarfile_samples([{"url": str(path)}]):
        yield {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


def write_samples(path: Path, samples: Sequence[dict[str, Any]]) -> None:
    """A webdataset tar of ``samples``, written atomically (members sorted per sample as given)."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def top_captions(web: str, synthetic: Sequence[str], scores: Sequence[float], keep: int) -> list[dict[str, Any]]:
    """The ``keep`` best distinct texts among the web caption (first) and the synthetic ones, by score;
    ties keep the earlier candidate."""
    candidates = ([(web, "web")] if web else []) + [(t, "synthetic") for t in synthetic]
    best: dict[str, tuple[float, int, str]] = {}
    for order, ((text, source), score) in enumerate(zip(candidates, scores)):
        if text and text not in best:
            best[text] = (score, order, source)
    ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[1][1]))[:keep]
    return [{"text": text, "score": round(score, 6), "source": source} for text, (score, _, source) in ranked]


class _ShardImages(torch.utils.data.Dataset):
    """Decoded model inputs of one shard's samples; an undecodable image gives ``None``."""

    def __init__(self, samples: list[dict[str, Any]], blip_preprocess, clip_preprocess):
        # only the preprocessors: DataLoader workers must not carry the models
        self.samples, self.blip_preprocess, self.clip_preprocess = samples, blip_preprocess, clip_preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        image = decode_image(self.samples[i])
        if image is None:
            return i, None
        blip = blip_pixels(self.blip_preprocess, image)
        return i, (blip, self.clip_preprocess(image))


def _collate(batch):
    return batch


class UnreadableShard(Blip2Error):
    """An input shard that is not a readable tar file."""


def process_shard(source: Path, target: Path, captioner: Captioner, ranker: Ranker,
                  recipe: CapFiltRecipe) -> dict[str, Any]:
    """Caption and rank every image of ``source``; write ``target`` (and its stats beside it) atomically."""
    start = time.perf_counter()
    try:
        samples = list(read_samples(source))
    except (tarfile.TarError, OSError) as e:
        raise UnreadableShard(f"{source}: not a readable tar shard ({str(e).splitlines()[0]})") from None
    images = _ShardImages(samples, captioner.processor.image_processor, ranker.preprocess)
    loader = torch.utils.data.DataLoader(images, batch_size=recipe.batch_size, num_workers=recipe.workers,
                                         collate_fn=_collate)
    kept: dict[int, list[dict[str, Any]]] = {}
    for batch in loader:
        good = [(i, views) for i, views in batch if views is not None]
        if not good:
            continue
        blip = torch.stack([views[0] for _, views in good])
        clip = torch.stack([views[1] for _, views in good])
        keys = [samples[i]["__key__"] for i, _ in good]
        n = recipe.decoding.num_captions
        seeds = torch.tensor([row_seed(recipe.seed, key, j) for key in keys for j in range(n)])
        synthetic = captioner.sample(blip, seeds, recipe.decoding)
        webs = [" ".join(web_caption(samples[i]).split()) for i, _ in good]
        per_image = [synthetic[k * n:(k + 1) * n] for k in range(len(good))]
        candidates = [([web] if web else []) + texts for web, texts in zip(webs, per_image)]
        scores = ranker.scores(clip, candidates)
        for (i, _), web, texts, sc in zip(good, webs, per_image, scores):
            kept[i] = top_captions(web, texts, sc, recipe.keep)
    out = []
    for i, sample in enumerate(samples):
        if i not in kept:
            continue
        meta = _json(sample)
        meta["captions"] = kept[i]
        out.append({**sample, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
    write_samples(target, out)
    web_kept = sum(any(c["source"] == "web" for c in kept[i]) for i in kept)
    stats = {"shard": source.name, "samples": len(samples), "captioned": len(out),
             "unreadable": len(samples) - len(out), "web_caption_kept": web_kept,
             "seconds": round(time.perf_counter() - start, 3)}
    atomic_write_text(stats_path(target), json.dumps(stats))
    return stats


def _json(sample: dict[str, Any]) -> dict[str, Any]:
    meta = sample_meta(sample)
    return meta if isinstance(meta, dict) else {"original": meta}


def stats_path(target: Path) -> Path:
    """A finished shard's stats file; it is written last, so its presence marks the shard done."""
    return target.with_name(target.name.removesuffix(".tar") + "_capfilt.json")


def list_shards(inputs: Sequence[str]) -> list[Path]:
    """Input shards: ``.tar`` files, directories of them, globs or brace patterns (``{00000..00099}``)."""
    shards = expand_shards(list(inputs))
    remote = next((s for s in shards if "://" in s or s.startswith("pipe:")), None)
    if remote is not None:
        raise Blip2Error(f"{remote}: capfilt reads local shards; copy them here first")
    names = [Path(s).name for s in shards]
    if len(set(names)) != len(names):
        raise Blip2Error("two input shards have the same file name; give shards from one directory at a time")
    return [Path(s) for s in shards]


def run_capfilt(shards: Sequence[Path], out: Path, recipe: CapFiltRecipe, device: torch.device,
                dtype: torch.dtype, rank: int = 0, world: int = 1, on_shard=None) -> list[dict[str, Any]]:
    """Process this rank's shards (every ``world``-th); finished ones are skipped. Returns their stats; a
    shard that cannot be read gives ``{"shard", "error"}`` instead, and the others go on (a rerun retries it)."""
    mine = [s for i, s in enumerate(shards) if i % world == rank]
    todo = [s for s in mine if not stats_path(out / s.name).exists()]
    results = [json.loads(stats_path(out / s.name).read_text()) for s in mine if s not in todo]
    if not todo:
        return results
    captioner = Captioner(recipe.captioner, device, dtype)
    ranker = Ranker(recipe.ranker, device, dtype)
    for shard in todo:
        try:
            stats = process_shard(shard, out / shard.name, captioner, ranker, recipe)
        except UnreadableShard as e:
            stats = {"shard": shard.name, "error": str(e)}
        results.append(stats)
        if on_shard is not None:
            on_shard(stats)
    return results


def summarize(out: Path) -> dict[str, Any]:
    """Totals over every finished shard in ``out``."""
    totals = {"shards": 0, "samples": 0, "captioned": 0, "unreadable": 0, "web_caption_kept": 0, "seconds": 0.0}
    for path in sorted(out.glob("*_capfilt.json")):
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        totals["shards"] += 1
        for key in ("samples", "captioned", "unreadable", "web_caption_kept", "seconds"):
            totals[key] += stats.get(key, 0)
    seconds = totals["seconds"]
    totals["images_per_second"] = round(totals["captioned"] / seconds, 3) if seconds else None
    totals["seconds"] = round(seconds, 3)
    return {"out": str(out), **totals}


@dataclass
class CapFiltRun:
    """What a CapFilt run did: the totals over every finished shard (rank 0; None on the other ranks) and the
    shards of this rank that could not be read (``{"shard", "error"}``)."""

    summary: dict[str, Any] | None
    failed: list[dict[str, Any]] = field(default_factory=list)

    def check(self) -> None:
        """An error naming the unreadable shards, if any (the others are done; a rerun retries only these)."""
        if self.failed:
            raise Blip2Error(f"{len(self.failed)} shard(s) could not be read and were skipped "
                             f"({self.failed[0]['error']}); the others are done, and a rerun retries only these")


def capfilt(shards: Sequence[str], out: Path, spec: CapFiltRecipe, device: str = "auto", dtype: str = "auto",
            on_shard: Callable[[dict[str, Any]], None] | None = None) -> CapFiltRun:
    """Caption the images of ``shards`` (files, directories, globs or brace patterns) into one shard each in
    ``out``, sharded over ranks under a launcher; ``on_shard`` is told each shard's stats as it finishes."""
    require_extra("data", "blip2 prepare capfilt")
    inputs = list_shards(shards)
    dev = rank_device(device)
    out.mkdir(parents=True, exist_ok=True)
    quiet_transformers()
    mine = len(inputs[dist.rank()::dist.world_size()])

    def finished(stats: dict[str, Any]) -> None:
        advance(1)
        if on_shard is not None:
            on_shard(stats)

    with progress("capfilt", mine) as advance:
        results = run_capfilt(inputs, out, spec, dev, resolve_dtype(dtype, dev), dist.rank(), dist.world_size(),
                              on_shard=finished)
    if dist.is_distributed():
        torch.distributed.barrier()
    summary = summarize(out) if dist.rank() == 0 else None
    return CapFiltRun(summary, [r for r in results if "error" in r])
