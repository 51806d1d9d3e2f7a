"""Side-by-side rounds: the sides run alternately (A B A B ...), each run in a fresh process, and each side is
reported by its best round with the spread across rounds, so that a busy machine shows as spread, not as a ratio."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue as queues
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Result = dict[str, Any]


def add_rounds_argument(parser: argparse.ArgumentParser, default: int = 3) -> None:
    """``--rounds N``: how many times each side runs (at least 1)."""

    def at_least_one(text: str) -> int:
        n = int(text)
        if n < 1:
            raise argparse.ArgumentTypeError(f"--rounds must be at least 1, not {n}")
        return n

    parser.add_argument("--rounds", type=at_least_one, default=default,
                        help=f"times each side runs, alternating with the other sides (default {default})")


def spawn(target: Callable[..., None], *args: Any) -> Result:
    """Run ``target(*args, queue)`` in a fresh spawned process and return the one result it puts on ``queue``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, results))
    proc.start()
    try:
        while True:
            try:
                return results.get(timeout=1)
            except queues.Empty:
                if not proc.is_alive():
                    try:
                        return results.get(timeout=5)
                    except queues.Empty:
                        raise RuntimeError(f"{getattr(target, '__name__', target)} exited with code {proc.exitcode} "
                                           "without a result") from None
    finally:
        proc.join()


def spawned(target: Callable[..., None], *args: Any) -> Callable[[int], Result]:
    """A side for ``alternate`` that runs ``spawn(target, *args)`` every round."""
    return lambda round_index: spawn(target, *args)


@dataclass
class Rounds:
    """Each side's results, one per round, and the order in which the runs happened."""

    runs: dict[str, list[Result]]
    order: list[str] = field(default_factory=list)

    def values(self, side: str, key: str) -> list[Any]:
        """``key`` of every round of ``side``."""
        return [run[key] for run in self.runs[side]]

    def best_run(self, side: str, key: str, higher: bool = True) -> Result:
        """The result of ``side``'s best round: the highest ``key`` (throughput) or, with ``higher=False``, the
        lowest (seconds)."""
        return (max if higher else min)(self.runs[side], key=lambda run: run[key])

    def best(self, side: str, key: str, higher: bool = True) -> float:
        """The best round's ``key`` (see ``best_run``)."""
        return self.best_run(side, key, higher)[key]

    def spread_pct(self, side: str, key: str, higher: bool = True) -> float:
        """How far the worst round is from the best, as a percentage of the best."""
        values = self.values(side, key)
        best, worst = (max(values), min(values)) if higher else (min(values), max(values))
        return abs(worst - best) / best * 100 if best else 0.0

    def ratio(self, side: str, other: str, key: str, higher: bool = True) -> float:
        """``side``'s best round over ``other``'s."""
        return self.best(side, key, higher) / self.best(other, key, higher)

    def peak(self, side: str, key: str) -> Any:
        """The largest ``key`` over the rounds (lists: per position); ``None`` when no round has one."""
        values = [v for v in self.values(side, key) if v is not None]
        if not values:
            return None
        if isinstance(values[0], (list, tuple)):
            return [max(column) for column in zip(*values)]
        return max(values)

    def timing(self, key: str, higher: bool = True, digits: int = 3) -> dict[str, Any]:
        """Report keys for every side: ``{side}_{key}_best`` (best round), ``_spread_pct`` and ``_rounds`` (all)."""
        report: dict[str, Any] = {}
        for side in self.runs:
            report[f"{side}_{key}_best"] = round(self.best(side, key, higher), digits)
            report[f"{side}_{key}_spread_pct"] = round(self.spread_pct(side, key, higher), 1)
            report[f"{side}_{key}_rounds"] = [round(v, digits) for v in self.values(side, key)]
        return report

    def peaks(self, key: str, digits: int = 0) -> dict[str, Any]:
        """Report keys for every side: ``{side}_{key}_max_over_rounds``."""
        return {f"{side}_{key}_max_over_rounds": _rounded(self.peak(side, key), digits) for side in self.runs}

    def differing(self, key: str, sides: Sequence[str] | None = None) -> list[tuple[str, int]]:
        """The (side, round) whose ``key`` differs from the first side's first round, among ``sides`` (default:
        all); an empty list when every round of every side agrees."""
        names = list(self.runs if sides is None else sides)
        expected = self.runs[names[0]][0][key]
        return [(side, r) for side in names for r, run in enumerate(self.runs[side]) if run[key] != expected]


def alternate(sides: Mapping[str, Callable[[int], Result]], rounds: int) -> Rounds:
    """Call every side once per round, in the order given, for ``rounds`` rounds; each call gets the round number
    (from 0) and starts its own process (``spawn``, or a launcher of its own)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    done = Rounds({name: [] for name in sides})
    for r in range(rounds):
        for name, run in sides.items():
            done.runs[name].append(run(r))
            done.order.append(name)
    return done


def _rounded(value: Any, digits: int) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return round(value, digits) if digits else round(value)
