"""One decode loop for every model that generates text: greedy search, beam search and nucleus sampling over a
model's key/value cache.

The model side is a :class:`Stepper`: it has already run the prompt once per image (the prefill) and returned
the logits of the first new token; the loop asks it for one more token at a time and tells it which rows to
keep. Beams and sampled texts start from the image's prefill (its cache is repeated, not recomputed), and an
image leaves the batch once its texts can no longer change.

Beam search ranks finished texts one of two ways (:attr:`Search.scoring`):

- ``transformers``: as transformers 5.x does (sum of log-probabilities over the generated tokens, EOS included,
  divided by their number ** ``length_penalty``; its early-stopping heuristic). The output equals ``generate``'s.
- ``lavis``: as transformers 4.26-4.33 did under LAVIS, which produced the paper's numbers: divided by the length
  of the whole hypothesis (``prefix_lengths``: BOS and prompt for a decoder-only LLM, the decoder start token for
  an encoder-decoder one) plus its generated tokens, EOS excluded; done when the best candidate of a step cannot
  beat the worst kept text at the current length; at the length limit the running beams join the finished ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .sampling import NucleusSampler

SCORINGS = ("transformers", "lavis")
_NEG = -1.0e9  # transformers' "never chosen" score


class Stepper(Protocol):
    """A model mid-decode: it holds one cache row per text being decoded, grouped by image (image-major)."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[rows, vocab]`` of the token after each row's ``tokens`` ``[rows]``."""

    def reorder(self, rows: torch.Tensor, images: torch.Tensor | None = None) -> None:
        """Row ``i`` continues from current row ``rows[i]``. ``images`` (indices of the current images, in order) is
        given when the images or their number of rows change; otherwise rows move within their image."""


@dataclass
class Search:
    """How one batch is decoded, every value resolved (the model's and the recipe's defaults applied)."""

    max_new_tokens: int
    eos: tuple[int, ...]
    pad: int
    num_beams: int = 1
    num_return_sequences: int = 1
    min_new_tokens: int | torch.Tensor = 0  # per image, or one for all
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as transformers defines them
    repetition_penalty: float | None = None
    scoring: str = "transformers"
    prefix_lengths: torch.Tensor | None = None  # lavis: per image, the tokens before the first new one
    sampler: NucleusSampler | None = None  # sampling (one beam): draws each text's token from its row seed
    sample_step_offset: int = 0  # sampling: the step number of the first new token

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"unknown beam scoring {self.scoring!r}: expected {' or '.join(SCORINGS)}")
        if self.sampler is not None and self.num_beams != 1:
            raise ValueError("sampling draws each text on its own: one beam")
        if self.sampler is None and self.num_return_sequences > self.num_beams:
            raise ValueError(f"{self.num_return_sequences} texts per image need as many beams, or sampling")


def decode(stepper: Stepper, first_logits: torch.Tensor, search: Search,
           history: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids ``[images * num_return_sequences, T]`` of the new tokens, image-major, best first; a text that ended
    early is filled after its EOS as transformers fills it. ``first_logits`` ``[images, vocab]``: the prefill's
    logits of the first new token. ``history`` ``[images, P]``: the ids the repetition penalty sees before the
    first new token (the prompt, as ``generate`` is given it)."""
    if search.num_beams > 1:
        return _beam_search(stepper, first_logits, search, history)
    return _one_beam(stepper, first_logits, search, history)


def _processors(search: Search):
    """transformers' logits processors for the settings it shares with ``generate`` (the repetition penalty)."""
    if search.repetition_penalty is None or search.repetition_penalty == 1.0:
        return None
    from transformers import RepetitionPenaltyLogitsProcessor

    return RepetitionPenaltyLogitsProcessor(search.repetition_penalty)


def _per_image(value: int | torch.Tensor, images: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return torch.full((images,), int(value), device=device)


def _block_eos(scores: torch.Tensor, too_short: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """``scores`` (changed in place) with EOS at -inf in the rows that are ``too_short`` to end."""
    scores[:, eos] = torch.where(too_short[:, None], -torch.inf, scores[:, eos])
    return scores


def _min_new(search: Search, images: int, device: torch.device) -> torch.Tensor:
    """Per image, the new tokens before EOS may come: under ``lavis``, the minimum counts the prefix."""
    minimum = _per_image(search.min_new_tokens, images, device)
    if search.scoring == "lavis" and search.prefix_lengths is not None:
        minimum = (minimum - search.prefix_lengths.to(device)).clamp(min=0)
    return minimum


class _LateReads:
    """Which images are still open, read on the host without stalling the device. On a GPU each step's flags are
    copied to pinned memory behind that step's kernels and read a step later, when the copy is long done, so the
    host keeps queueing work (an image that ended leaves a step late, which changes nothing: it is frozen). On the
    CPU they are read at once."""

    late_on_cpu = False  # read late on the CPU too (tests of the GPU's path)

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.late = self.cuda or self.late_on_cpu
        self.pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    def flags(self, still_open: torch.Tensor) -> torch.Tensor | None:
        """Given this step's flags (one per image of the current layout), the host flags to act on now, or None."""
        if not self.late:
            return still_open.cpu()
        if self.cuda:
            host = torch.empty(still_open.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(still_open, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = still_open.clone(), None
        ready, self.pending = self.pending, (host, event)
        if ready is None:
            return None
        if ready[1] is not None:
            ready[1].synchronize()
        return ready[0]

    def regrouped(self) -> None:
        """The images were narrowed: flags read before no longer describe the layout."""
        self.pending = None

    def indices(self, flags: torch.Tensor, device: torch.device) -> torch.Tensor:
        kept = flags.nonzero().squeeze(1)
        return kept.pin_memory().to(device, non_blocking=True) if self.cuda else kept.to(device)


def _one_beam(stepper: Stepper, logits: torch.Tensor, search: Search, history: torch.Tensor | None) -> torch.Tensor:
    """Greedy search (argmax) or sampling, ``num_return_sequences`` rows per image; a finished row is filled with
    pad while its image's other rows go on, and an image leaves once all of its rows have ended."""
    images, device = logits.shape[0], logits.device
    n = search.num_return_sequences
    if n > 1:
        expand = torch.arange(images, device=device).repeat_interleave(n)
        stepper.reorder(expand, torch.arange(images, device=device))
        logits = logits[expand]
        history = history[expand] if history is not None else None
    processors = _processors(search)
    eos = torch.tensor(search.eos, device=device)
    min_new = _min_new(search, images, device).repeat_interleave(n)
    seeds = search.sampler.row_seeds.to(device) if search.sampler is not None else None
    out = torch.full((images * n, search.max_new_tokens), search.pad, dtype=torch.long, device=device)
    live = torch.arange(images * n, device=device)  # the rows still decoded, by their index in ``out``
    ended = torch.zeros(images * n, dtype=torch.bool, device=device)
    reads = _LateReads(device)
    steps_run = torch.zeros((), dtype=torch.long, device=device)  # steps that began with a row not yet ended
    for t in range(search.max_new_tokens):
        scores = logits.float()
        if processors is not None:
            scores = processors(history, scores)
        scores = _block_eos(scores, t < min_new[live], eos)
        if search.sampler is not None:
            token = search.sampler.draw(scores, seeds[live], search.sample_step_offset + t)
        else:
            token = scores.argmax(dim=-1)
        steps_run += (~ended[live]).any()
        token = torch.where(ended[live], search.pad, token)
        out[live, t] = token
        ended[live] |= torch.isin(token, eos)
        if t + 1 == search.max_new_tokens:
            break
        still_open = reads.flags(~ended[live].view(-1, n).all(dim=1))
        if still_open is not None and not still_open.any():
            break
        if history is not None:
            history = torch.cat([history, token[:, None]], dim=1)
        if still_open is not None and not still_open.all():
            kept = reads.indices(still_open, device)
            rows = (kept[:, None] * n + torch.arange(n, device=device)).flatten()
            stepper.reorder(rows, kept)
            live, token = live[rows], token[rows]
            history = history[rows] if history is not None else None
            reads.regrouped()
        logits = stepper.step(token)
    return out[:, :int(steps_run)]


@dataclass
class _Beams:
    """Per image: the running beams and the finished texts kept so far (``[images, beams, ...]``)."""

    running: torch.Tensor  # tokens
    running_scores: torch.Tensor
    finished: torch.Tensor  # tokens
    finished_scores: torch.Tensor
    finished_lengths: torch.Tensor
    is_finished: torch.Tensor  # the slot holds a finished text
    improvable: torch.Tensor  # [images]: the running beams may still beat a finished text

    def select(self, images: torch.Tensor) -> _Beams:
        return _Beams(*(getattr(self, f)[images] for f in self.__dataclass_fields__))


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]``: the beams ``index`` of each image."""
    while index.dim() < x.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(x, index, dim=1)


def _beam_search(stepper: Stepper, logits: torch.Tensor, search: Search, history: torch.Tensor | None) -> torch.Tensor:
    """Beam search over ``num_beams`` rows per image, finished texts ranked by ``search.scoring``."""
    images, vocab = logits.shape
    device = logits.device
    k, steps = search.num_beams, search.max_new_tokens
    lavis = search.scoring == "lavis"
    eos = torch.tensor(search.eos, device=device)
    candidates = 2 * k if lavis else max(2, 1 + len(search.eos)) * k
    fill = search.pad if search.pad else search.eos[0]  # transformers fills beam outputs with pad, or EOS for pad 0
    expand = torch.arange(images, device=device).repeat_interleave(k)
    stepper.reorder(expand, torch.arange(images, device=device))
    logits = logits[expand]
    history = history[expand] if history is not None else None
    processors = _processors(search)
    min_new = _min_new(search, images, device)
    prefix = search.prefix_lengths.to(device).float() if lavis else None
    penalty = search.length_penalty

    running_scores = torch.zeros(images, k, device=device)
    running_scores[:, 1:] = _NEG
    beams = _Beams(
        running=torch.full((images, k, steps), fill, dtype=torch.long, device=device),
        running_scores=running_scores,
        finished=torch.full((images, k, steps), fill, dtype=torch.long, device=device),
        finished_scores=torch.full((images, k), _NEG, device=device),
        finished_lengths=torch.zeros(images, k, dtype=torch.long, device=device),
        is_finished=torch.zeros(images, k, dtype=torch.bool, device=device),
        improvable=torch.ones(images, dtype=torch.bool, device=device))
    results = _Beams(*(x.clone() for x in (beams.running, beams.running_scores, beams.finished,
                                           beams.finished_scores, beams.finished_lengths, beams.is_finished,
                                           beams.improvable)))
    live = torch.arange(images, device=device)  # the images still decoded, by their index in ``results``
    reads = _LateReads(device)
    top_k_mask = torch.arange(candidates, device=device) < k
    for t in range(steps):
        n = live.numel()
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if processors is not None:
            log_probs = processors(history, log_probs)
        log_probs = _block_eos(log_probs, (t < min_new[live]).repeat_interleave(k), eos)
        totals = (log_probs.view(n, k, vocab) + beams.running_scores[:, :, None]).view(n, k * vocab)
        scores, index = totals.topk(candidates, dim=1)
        source, tokens = index // vocab, index % vocab
        sequences = _gather(beams.running, source)
        sequences[:, :, t] = tokens
        is_eos = torch.isin(tokens, eos)
        last = t + 1 == steps
        if lavis:
            source_rows = _lavis_step(beams, scores, source, sequences, is_eos, top_k_mask, prefix[live], t, last,
                                      k, penalty, search.early_stopping, steps)
        else:
            source_rows = _transformers_step(beams, scores, source, sequences, is_eos | last, top_k_mask, t, k,
                                             penalty, search.early_stopping, steps)
        if last:
            break
        tokens_next = beams.running[:, :, t].flatten()
        open_images = beams.improvable
        if search.early_stopping is True:
            open_images = open_images & ~beams.is_finished.all(dim=1)
        still_open = reads.flags(open_images)
        rows = (torch.arange(n, device=device)[:, None] * k + source_rows).flatten()
        if still_open is not None and not still_open.all():
            _store(results, beams, live)
            if not still_open.any():
                break
            kept = reads.indices(still_open, device)
            beams, live = beams.select(kept), live[kept]
            rows = rows.view(n, k)[kept].flatten()
            tokens_next = tokens_next.view(n, k)[kept].flatten()
            stepper.reorder(rows, kept)
            reads.regrouped()
        else:
            stepper.reorder(rows)
        if history is not None:
            history = torch.cat([history[rows], tokens_next[:, None]], dim=1)
        logits = stepper.step(tokens_next)
    _store(results, beams, live)
    return _best(results, search.num_return_sequences)


def _transformers_step(beams: _Beams, scores: torch.Tensor, source: torch.Tensor, sequences: torch.Tensor,
                       stops: torch.Tensor, top_k_mask: torch.Tensor, t: int, k: int, penalty: float,
                       early_stopping: bool | str, steps: int) -> torch.Tensor:
    """One step of transformers 5.x's beam search (``_beam_search``); returns each new running beam's source."""
    running_log_probs = scores + stops.float() * _NEG
    pick = running_log_probs.topk(k, dim=1).indices
    beams.running = _gather(sequences, pick)
    beams.running_scores = _gather(running_log_probs, pick)
    sources = _gather(source, pick)

    just_finished = stops & top_k_mask[None, :]
    finished_scores = scores / ((t + 1) ** penalty)
    full = beams.is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
    finished_scores = finished_scores + full.float() * _NEG
    finished_scores = finished_scores + (~beams.improvable[:, None]).float() * _NEG
    finished_scores = finished_scores + (~just_finished) * _NEG
    _merge(beams, sequences, finished_scores, torch.full_like(scores, t + 1, dtype=torch.long), just_finished, k)

    length = steps if early_stopping == "never" and penalty > 0.0 else t + 1
    best_possible = beams.running_scores[:, :1] / (length ** penalty)
    worst = torch.where(beams.is_finished, torch.min(beams.finished_scores, dim=1, keepdim=True)[0], _NEG)
    beams.improvable = beams.improvable & torch.any(best_possible > worst, dim=-1)
    return sources


def _lavis_step(beams: _Beams, scores: torch.Tensor, source: torch.Tensor, sequences: torch.Tensor,
                is_eos: torch.Tensor, top_k_mask: torch.Tensor, prefix: torch.Tensor, t: int, last: bool, k: int,
                penalty: float, early_stopping: bool | str, steps: int) -> torch.Tensor:
    """One step of transformers 4.26-4.33's ``BeamSearchScorer.process`` (and ``finalize`` at the last step)."""
    pick = (scores + is_eos.float() * _NEG).topk(k, dim=1).indices  # the best non-EOS candidates continue
    beams.running = _gather(sequences, pick)
    beams.running_scores = _gather(scores, pick)
    sources = _gather(source, pick)

    length = prefix[:, None] + t  # the hypothesis before its EOS: prefix and t new tokens
    just_finished = is_eos & top_k_mask[None, :] & beams.improvable[:, None]
    finished_scores = torch.where(just_finished, scores / length ** penalty, _NEG)
    _merge(beams, sequences, finished_scores, torch.full_like(scores, t + 1, dtype=torch.long), just_finished, k)

    full = beams.is_finished.all(dim=1)
    if early_stopping is True:
        done = full
    else:
        reach = prefix + steps if early_stopping == "never" and penalty > 0.0 else prefix + t
        worst = torch.min(beams.finished_scores, dim=1)[0]
        done = full & (worst >= scores[:, 0] / reach ** penalty)
    if last:  # finalize: the running beams of an image not done join its finished texts
        at_limit = (prefix[:, None] + steps).expand(-1, k)
        kept = beams.improvable & ~done
        final_scores = torch.where(kept[:, None], beams.running_scores / at_limit ** penalty, _NEG)
        _merge(beams, beams.running, final_scores, torch.full_like(final_scores, steps, dtype=torch.long),
               kept[:, None].expand(-1, k), k)
    beams.improvable = beams.improvable & ~done
    return sources


def _merge(beams: _Beams, sequences: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor,
           finished: torch.Tensor, k: int) -> None:
    """Keep each image's ``k`` best finished texts among those kept and the new ones (``scores`` at -1e9 or below
    where ``finished`` is false)."""
    merged_scores = torch.cat([beams.finished_scores, scores], dim=1)
    pick = merged_scores.topk(k, dim=1).indices
    beams.finished = _gather(torch.cat([beams.finished, sequences], dim=1), pick)
    beams.finished_scores = _gather(merged_scores, pick)
    beams.finished_lengths = _gather(torch.cat([beams.finished_lengths, lengths], dim=1), pick)
    beams.is_finished = _gather(torch.cat([beams.is_finished, finished], dim=1), pick)


def _store(results: _Beams, beams: _Beams, live: torch.Tensor) -> None:
    for name in ("finished", "finished_scores", "finished_lengths", "is_finished"):
        getattr(results, name)[live] = getattr(beams, name)


def _best(results: _Beams, n: int) -> torch.Tensor:
    """The ``n`` best finished texts of each image (kept best first), image-major, cut to the longest returned."""
    tokens, lengths = results.finished[:, :n].flatten(0, 1), results.finished_lengths[:, :n].flatten()
    return tokens[:, :int(lengths.max()) if lengths.numel() else 0]
