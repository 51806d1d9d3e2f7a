"""Image-text retrieval: ITC similarity for every pair, then the top k re-ranked by ITM.

The score of a re-ranked pair is the mean class-1 ITM logit over the queries plus the ITC similarity
(LAVIS ``compute_sim_matrix``). Memory is bounded by k and the batch size, not by the number of
images: the first pass over the images keeps only their query features and running top-k lists; the
second pass recomputes each image batch's ViT tokens and scores every pair that involves those
images. (LAVIS keeps every image's ViT tokens, about 19 GB for the 5k COCO test images at 364 px.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..config import checked, load_recipe
from ..models.qformer_text import qformer_text
from ..runtime.io import atomic_path
from ..runtime import dist
from .data import ZeroShot
from .paper import PaperFigures

# The recipe whose numbers serve a caller that gives no settings: LAVIS's retrieval protocol, which every retrieval
# recipe shares (the text length, the batches; k too in the paper's two benchmarks).
PROTOCOL = "eval/flickr30k"


@dataclass
class RetrievalEval:
    """A retrieval benchmark's settings, zero-shot protocol and the paper's figures
    (``recipes/eval/<benchmark>.yaml``)."""

    k: int = checked(ge=1)  # candidates re-ranked by ITM per image and per text
    batch_size: int = checked(ge=1)  # images per ViT pass
    text_batch: int = checked(ge=1)  # texts per Q-Former pass (their ITC features)
    itm_batch: int = checked(ge=1)  # image-text pairs per ITM pass
    max_txt_len: int = checked(ge=1)  # text tokens read, [CLS] and [SEP] included
    zero_shot: ZeroShot = field(default_factory=ZeroShot)
    paper: PaperFigures = field(default_factory=PaperFigures)  # the paper's figures, shown beside the recalls


@dataclass
class RetrievalScores:
    i2t_index: torch.Tensor  # (images, k) text indices, best ITC first
    i2t_score: torch.Tensor  # (images, k) ITM + ITC
    t2i_index: torch.Tensor  # (texts, k)
    t2i_score: torch.Tensor  # (texts, k)

    def image_ranking(self, i: int) -> list[int]:
        """Texts for image ``i``, best first, after re-ranking."""
        order = self.i2t_score[i].argsort(descending=True)
        return self.i2t_index[i][order].tolist()

    def text_ranking(self, t: int) -> list[int]:
        order = self.t2i_score[t].argsort(descending=True)
        return self.t2i_index[t][order].tolist()


def _merge_topk(values: torch.Tensor, index: torch.Tensor, new_values: torch.Tensor, new_index: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    both_v, both_i = torch.cat([values, new_values], 1), torch.cat([index, new_index], 1)
    top = both_v.topk(min(k, both_v.shape[1]), dim=1)
    return top.values, both_i.gather(1, top.indices)


def _save(obj: dict, path: Path) -> None:
    """Atomically, creating the run directory if this rank is the first to write there."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@torch.inference_mode()
def retrieval_scores(model, images: Sequence[str | Path], texts: Sequence[str], k: int | None = None,
                     batch_size: int | None = None, text_batch: int | None = None, max_length: int | None = None,
                     itm_batch: int | None = None, work_dir: Path | None = None,
                     settings: RetrievalEval | None = None) -> RetrievalScores:
    """Re-ranked top-k lists in both directions; images are split over the ranks of a process group.

    The numbers are ``settings``' (a benchmark's recipe; without it, the protocol's recipe ``PROTOCOL``), each of
    ``k``, ``batch_size``, ``text_batch``, ``max_length`` (``max_txt_len``) and ``itm_batch`` given replacing
    its own. With ``work_dir``, the ITC top-k lists and each finished batch of ITM scores are kept there, so a
    killed run continues without recomputing them.
    """
    given = {"k": k, "batch_size": batch_size, "text_batch": text_batch, "max_txt_len": max_length,
             "itm_batch": itm_batch}
    spec = replace(settings or load_recipe(RetrievalEval, PROTOCOL),
                   **{name: value for name, value in given.items() if value is not None})
    k, batch_size, text_batch, itm_batch = spec.k, spec.batch_size, spec.text_batch, spec.itm_batch
    net = model.matching_network()
    k_t, k_i = min(k, len(texts)), min(k, len(images))
    # no longer than the Q-Former's text positions (a small model may have fewer than the protocol's 35)
    length = min(spec.max_txt_len, net.config.qformer.max_position_embeddings)
    ids, mask = qformer_text(model.checkpoint.qformer_tokenizer, texts, length, model.device, pad_to_max=True)
    text_feats = torch.cat([net.text_features(ids[s:s + text_batch], mask[s:s + text_batch])
                            for s in range(0, len(texts), text_batch)])

    rank, world = dist.rank(), dist.world_size()
    batches = [list(range(s, min(s + batch_size, len(images)))) for s in range(0, len(images), batch_size)]
    mine = batches[rank::world]

    shape = {"images": len(images), "texts": len(texts), "k": k, "batch_size": batch_size, "world": world}
    itc_file = work_dir / "itc.pt" if work_dir is not None else None
    cached = torch.load(itc_file, weights_only=True) if itc_file is not None and itc_file.exists() else None
    if cached is not None and cached["shape"] == shape:
        i2t_v, i2t_i, t2i_v, t2i_i = (cached[n].to(model.device) for n in ("i2t_v", "i2t_i", "t2i_v", "t2i_i"))
    else:
        i2t_v, i2t_i, t2i_v, t2i_i = _itc_pass(model, net, images, text_feats, mine, k_t, k_i)
        if itc_file is not None and rank == 0:
            _save({"shape": shape, "i2t_v": i2t_v.cpu(), "i2t_i": i2t_i.cpu(), "t2i_v": t2i_v.cpu(),
                   "t2i_i": t2i_i.cpu()}, itc_file)

    # pass 2: ITM for the top-k pairs of this rank's images (image tokens recomputed per batch)
    i2t_s = torch.zeros_like(i2t_v)
    t2i_s = torch.zeros_like(t2i_v)
    done: list[int] = []
    itm_file = work_dir / f"itm.rank{rank:03d}.pt" if work_dir is not None else None
    if itm_file is not None and itm_file.exists():
        progress = torch.load(itm_file, weights_only=True)
        if progress["shape"] == shape:
            done, i2t_s, t2i_s = list(progress["done"]), progress["i2t_s"].to(model.device), progress["t2i_s"].to(
                model.device)
    for number, batch in enumerate(mine):
        if number in done:
            continue
        _itm_batch(model, net, images, ids, mask, batch, i2t_i, t2i_i, i2t_s, t2i_s, itm_batch)
        done.append(number)
        if itm_file is not None:
            _save({"shape": shape, "done": done, "i2t_s": i2t_s.cpu(), "t2i_s": t2i_s.cpu()}, itm_file)
    if world > 1:
        for tensor in (i2t_s, t2i_s):
            torch.distributed.all_reduce(tensor)  # every pair was scored by exactly one rank
    return RetrievalScores(i2t_i.cpu(), (i2t_s + i2t_v).cpu(), t2i_i.cpu(), (t2i_s + t2i_v).cpu())


def _itc_pass(model, net, images, text_feats, mine, k_t: int, k_i: int):
    """ITC for every pair of this rank's images, keeping top-k lists only; merged over ranks."""
    n_texts = text_feats.shape[0]
    i2t_v = torch.full((len(images), k_t), float("-inf"), device=model.device)
    i2t_i = torch.zeros((len(images), k_t), dtype=torch.long, device=model.device)
    t2i_v = torch.full((n_texts, 0), float("-inf"), device=model.device)
    t2i_i = torch.zeros((n_texts, 0), dtype=torch.long, device=model.device)
    for batch in mine:
        embeds = model.image_embeds([images[i] for i in batch])
        sims = net.similarity(net.image_features(embeds), text_feats).float()  # (b, texts)
        top = sims.topk(k_t, dim=1)
        i2t_v[batch], i2t_i[batch] = top.values, top.indices
        index = torch.tensor(batch, device=model.device).expand(n_texts, -1)
        t2i_v, t2i_i = _merge_topk(t2i_v, t2i_i, sims.T, index, k_i)
    if dist.world_size() > 1:
        i2t_v, i2t_i = _sum_filled(i2t_v, i2t_i, mine)
        t2i_v, t2i_i = _gather_topk(t2i_v, t2i_i, k_i)
    return i2t_v, i2t_i, t2i_v, t2i_i


def _itm_batch(model, net, images, ids, mask, batch, i2t_i, t2i_i, i2t_s, t2i_s, itm_batch: int) -> None:
    """Score by ITM every top-k pair that involves the images of ``batch`` (written into i2t_s / t2i_s)."""
    embeds = model.image_embeds([images[i] for i in batch])
    pairs = []  # (image row in batch, text, where to write)
    for row, i in enumerate(batch):
        pairs += [(row, int(t), ("i2t", i, j)) for j, t in enumerate(i2t_i[i].tolist())]
    in_batch = {i: row for row, i in enumerate(batch)}
    hits = (t2i_i.unsqueeze(-1) == torch.tensor(batch, device=model.device)).any(-1).nonzero().tolist()
    pairs += [(in_batch[int(t2i_i[t, j])], t, ("t2i", t, j)) for t, j in hits]
    for s in range(0, len(pairs), itm_batch):
        chunk = pairs[s:s + itm_batch]
        rows = torch.tensor([p[0] for p in chunk], device=model.device)
        txt = torch.tensor([p[1] for p in chunk], device=model.device)
        logits = net.itm_logits(embeds[rows], ids[txt], mask[txt])[:, 1].float()
        for (_, _, (direction, a, b)), value in zip(chunk, logits.tolist()):
            (i2t_s if direction == "i2t" else t2i_s)[a, b] = value


def _sum_filled(values: torch.Tensor, index: torch.Tensor, mine: list[list[int]]):
    """Each rank filled its own image rows; combine them (rows of other ranks are zeroed first)."""
    rows = torch.tensor([i for batch in mine for i in batch], dtype=torch.long, device=values.device)
    keep = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
    keep[rows] = True
    v = torch.where(keep[:, None], values, torch.zeros_like(values))
    ix = torch.where(keep[:, None], index, torch.zeros_like(index))
    torch.distributed.all_reduce(v)
    torch.distributed.all_reduce(ix)
    return v, ix


def _gather_topk(values: torch.Tensor, index: torch.Tensor, k: int):
    """Merge every rank's running top-k lists (over its images) into the global top-k."""
    world = dist.world_size()
    if values.shape[1] < k:  # a rank with fewer than k images: pad with entries that never win
        pad = k - values.shape[1]
        values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], 1)
        index = torch.cat([index, index.new_zeros((index.shape[0], pad))], 1)
    parts_v = [torch.empty_like(values) for _ in range(world)]
    parts_i = [torch.empty_like(index) for _ in range(world)]
    torch.distributed.all_gather(parts_v, values.contiguous())
    torch.distributed.all_gather(parts_i, index.contiguous())
    both_v, both_i = torch.cat(parts_v, 1), torch.cat(parts_i, 1)
    top = both_v.topk(k, dim=1)
    return top.values, both_i.gather(1, top.indices)


def recall_metrics(scores: RetrievalScores, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]) -> dict:
    """TR@1/5/10 (an image's rank = its best ground-truth text) and IR@1/5/10, in percent (LAVIS)."""
    def at(ranks: list[int], n: int) -> float:
        return 100.0 * sum(r < n for r in ranks) / len(ranks)

    big = 10**9
    image_ranks = []
    for i, gts in enumerate(img2txt):
        ranking = scores.image_ranking(i)
        image_ranks.append(min((ranking.index(t) for t in gts if t in ranking), default=big))
    text_ranks = []
    for t, gt in enumerate(txt2img):
        ranking = scores.text_ranking(t)
        text_ranks.append(ranking.index(gt) if gt in ranking else big)
    result = {f"txt_r{n}": at(image_ranks, n) for n in (1, 5, 10)}
    result.update({f"img_r{n}": at(text_ranks, n) for n in (1, 5, 10)})
    result["txt_r_mean"] = sum(result[f"txt_r{n}"] for n in (1, 5, 10)) / 3
    result["img_r_mean"] = sum(result[f"img_r{n}"] for n in (1, 5, 10)) / 3
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result
