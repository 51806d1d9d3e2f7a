"""Counter-based nucleus sampling: every draw is a pure function of (row seed, step, proposal), so a text does not
depend on the batch it is decoded in or on the number of processes."""

from __future__ import annotations

import hashlib

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``(x * constant) mod 2**32`` for int64 ``x`` in [0, 2**32), without int64 overflow."""
    hi, lo = constant >> 16, constant & 0xFFFF
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection of [0, 2**32) that scrambles every bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def uniform_at(seeds: torch.Tensor, step: int, draw: int = 0) -> torch.Tensor:
    """One uniform number in (0, 1) per row seed, a pure function of (seed, step, draw)."""
    x = _mix32(_mix32(seeds.to(torch.int64) & _MASK32) ^ (step & _MASK32))
    if draw:
        x = _mix32(x ^ _mul32(torch.full_like(x, draw), 0x9E3779B9))
    return ((x >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def row_seed(seed: int, key: str, index: int) -> int:
    """A stable 32-bit seed for caption ``index`` of sample ``key``."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class NucleusSampler:
    """A logits processor that draws the next token as transformers' sampling does with ``TopKLogitsWarper``
    then ``TopPLogitsWarper``, and returns scores whose argmax is that token (0 there, -inf elsewhere), so
    greedy decoding with it is sampling.

    The nucleus is the most probable tokens (among the ``top_k`` best, when set) up to mass ``top_p``, the
    token that crosses it included. With ``top_k`` the draw inverts the nucleus's cumulative distribution over
    the ``top_k`` best tokens. Without it, a draw proposes a token from the whole distribution (inverting its
    cumulative sum in vocabulary order) and accepts it if the mass of the more probable tokens is below
    ``top_p``, i.e. if it is in the nucleus: accepted tokens follow the nucleus's renormalised distribution,
    and as the nucleus holds at least ``top_p`` of the mass one proposal almost always suffices, with no sort
    over the vocabulary (rows still rejected after ``proposals`` tries, possible only at tiny ``top_p``, are
    drawn from the sorted nucleus). Every uniform number is a pure function of (row seed, step, proposal), so
    a caption does not depend on the batch it is decoded in."""

    def __init__(self, top_p: float, row_seeds: torch.Tensor, top_k: int = 0, proposals: int = 16):
        self.top_p, self.top_k, self.row_seeds, self.proposals = top_p, top_k, row_seeds, proposals

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = self.draw(scores, self.row_seeds.to(scores.device), input_ids.shape[1])
        out = torch.full(scores.shape, -torch.inf, dtype=torch.float32, device=scores.device)
        return out.scatter_(1, chosen[:, None], 0.0)

    def draw(self, scores: torch.Tensor, row_seeds: torch.Tensor, step: int) -> torch.Tensor:
        """The token drawn for each row of ``scores`` ``[rows, vocab]``."""
        scores = scores.float()
        if 0 < self.top_k < scores.shape[-1]:
            best, order = scores.topk(self.top_k, dim=-1)  # sorted, most probable first
            return order.gather(1, self._in_order(best.softmax(dim=-1), row_seeds, step, 0)).squeeze(1)
        probs = scores.softmax(dim=-1)
        cumulative = probs.cumsum(dim=-1)
        chosen, accepted = self._propose(probs, cumulative, row_seeds, step, 0)
        pending = (~accepted).nonzero().squeeze(1)
        for proposal in range(1, self.proposals):
            if not len(pending):
                return chosen
            token, accepted = self._propose(probs[pending], cumulative[pending], row_seeds[pending], step, proposal)
            chosen[pending[accepted]] = token[accepted]
            pending = pending[~accepted]
        if len(pending):
            ordered, order = probs[pending].sort(dim=-1, descending=True)
            index = self._in_order(ordered, row_seeds[pending], step, self.proposals)
            chosen[pending] = order.gather(1, index).squeeze(1)
        return chosen

    def _propose(self, probs: torch.Tensor, cumulative: torch.Tensor, row_seeds: torch.Tensor, step: int,
                 proposal: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A token per row drawn from ``probs``, and whether it lies in the nucleus."""
        target = uniform_at(row_seeds, step, proposal)[:, None] * cumulative[:, -1:]
        token = torch.searchsorted(cumulative, target).clamp(max=probs.shape[1] - 1)
        above = torch.where(probs > probs.gather(1, token), probs, 0.0).sum(dim=-1)
        return token.squeeze(1), above < self.top_p

    def _in_order(self, ordered: torch.Tensor, row_seeds: torch.Tensor, step: int, draw: int) -> torch.Tensor:
        """``[rows, 1]``: the position drawn from probabilities sorted most probable first, within the nucleus."""
        cumulative = ordered.cumsum(dim=-1)
        size = (cumulative - ordered < self.top_p).sum(dim=-1, keepdim=True).clamp(min=1)
        target = uniform_at(row_seeds, step, draw)[:, None] * cumulative.gather(1, size - 1)
        return torch.searchsorted(cumulative, target).clamp(max=size - 1)
