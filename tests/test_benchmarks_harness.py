"""The benchmarks' rounds harness: sides alternate, each run in a fresh process; best rounds, spreads and
mismatches are what the rounds returned."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from benchmarks._rounds import Rounds, alternate, spawn

VALUES = {"a": [3.0, 1.0, 2.0], "b": [4.0, 8.0, 5.0]}  # per side, what its n-th run returns


def _record(name: str, log: str) -> int:
    """Append ``name`` to the log; return how many times this side ran before."""
    path = Path(log)
    before = path.read_text().split() if path.exists() else []
    with path.open("a") as f:
        f.write(name + "\n")
    return before.count(name)


def side_a(log: str, queue) -> None:
    n = _record("a", log)
    queue.put({"value": VALUES["a"][n], "pid": os.getpid(), "at": time.monotonic_ns(), "output": ["x", "y"]})


def side_b(log: str, queue) -> None:
    n = _record("b", log)
    queue.put({"value": VALUES["b"][n], "pid": os.getpid(), "at": time.monotonic_ns(), "output": ["x", "y"]})


def side_b_drifting(log: str, queue) -> None:
    """Agrees with side a in its first run only."""
    n = _record("b", log)
    queue.put({"value": 1.0, "pid": os.getpid(), "at": time.monotonic_ns(), "output": ["x", "y" if n == 0 else "z"]})


def side_failing(queue) -> None:
    raise SystemExit(3)


def run(tmp_path: Path, b=side_b, rounds: int = 3) -> tuple[Rounds, list[int]]:
    log = str(tmp_path / "log")
    seen: list[int] = []

    def called(target):
        def runner(r: int):
            seen.append(r)
            return spawn(target, log)
        return runner

    result = alternate({"a": called(side_a), "b": called(b)}, rounds)
    assert (tmp_path / "log").read_text().split() == result.order
    return result, seen


def test_sides_alternate_each_round_in_a_fresh_process(tmp_path):
    result, seen = run(tmp_path)
    assert result.order == ["a", "b", "a", "b", "a", "b"]
    assert seen == [0, 0, 1, 1, 2, 2]
    assert [len(result.runs[s]) for s in "ab"] == [3, 3]
    runs = sorted((run["at"], side) for side in "ab" for run in result.runs[side])
    assert [side for _, side in runs] == ["a", "b", "a", "b", "a", "b"]
    pids = [run["pid"] for side in "ab" for run in result.runs[side]]
    assert len(set(pids)) == 6 and os.getpid() not in pids
    assert result.values("a", "value") == VALUES["a"] and result.values("b", "value") == VALUES["b"]


def test_best_spread_and_ratio_are_those_of_the_rounds(tmp_path):
    result, _ = run(tmp_path)
    for side, values in VALUES.items():
        hi, lo = max(values), min(values)
        assert result.best(side, "value") == hi
        assert result.best(side, "value", higher=False) == lo
        assert result.spread_pct(side, "value") == pytest.approx((hi - lo) / hi * 100)
        assert result.spread_pct(side, "value", higher=False) == pytest.approx((hi - lo) / lo * 100)
        assert result.peak(side, "value") == hi
    assert result.ratio("b", "a", "value") == pytest.approx(8.0 / 3.0)
    assert result.ratio("b", "a", "value", higher=False) == pytest.approx(4.0 / 1.0)
    report = result.timing("value")
    assert report["a_value_best"] == 3.0 and report["b_value_rounds"] == VALUES["b"]
    assert report["b_value_spread_pct"] == round((8.0 - 4.0) / 8.0 * 100, 1)
    assert result.peaks("value") == {"a_value_max_over_rounds": 3, "b_value_max_over_rounds": 8}
    assert result.differing("output") == []


def test_a_mismatch_in_any_round_is_reported(tmp_path):
    result, _ = run(tmp_path, b=side_b_drifting)
    assert result.differing("output") == [("b", 1), ("b", 2)]
    assert result.differing("output", sides=["a"]) == []


def test_one_round_and_bad_counts(tmp_path):
    result, _ = run(tmp_path, rounds=1)
    assert result.order == ["a", "b"] and result.spread_pct("a", "value") == 0.0
    with pytest.raises(ValueError):
        alternate({"a": lambda r: {}}, 0)


def test_a_side_that_dies_without_a_result_is_an_error():
    with pytest.raises(RuntimeError, match="code 3"):
        spawn(side_failing)


def test_peaks_of_lists_are_per_position():
    result = Rounds({"z": [{"m": [1, 5]}, {"m": [4, 2]}], "g": [{"m": None}, {"m": None}]})
    assert result.peak("z", "m") == [4, 5] and result.peak("g", "m") is None


def test_finetune_step_arguments_and_full_architecture():
    """``benchmarks.finetune_step``: each size's defaults, the GPU-only switches refused on the CPU, and the
    ``--full`` model (EVA ViT-g, BERT-base Q-Former, OPT-2.7B) assembled on the meta device."""
    import torch

    from benchmarks.finetune_step import parse_args, stage2_config
    from blip2cli.models.blip2 import Blip2ImageToText

    mid = parse_args([])
    assert (mid.batch, mid.steps, mid.rounds) == (4, 2, 3)
    assert mid.sides == ["trained", "frozen", "checkpointing", "zero2x2"]
    tiny = parse_args(["--tiny", "--rounds", "1", "--sides", "trained", "frozen"])
    assert (tiny.tiny, tiny.rounds, tiny.sides) == (True, 1, ["trained", "frozen"])
    full = parse_args(["--full", "--device", "cuda", "--find-max-batch"])
    assert (full.batch, full.sides, full.find_max_batch) == (16, ["trained", "checkpointing"], True)
    for argv in (["--full"], ["--find-max-batch"], ["--full", "--tiny", "--device", "cuda"], ["--batch", "3"],
                 ["--rounds", "0"], ["--cores", "0"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
    cfg, _ = stage2_config("full")
    with torch.device("meta"):
        net = Blip2ImageToText(cfg)
    shape = (cfg.vision.width, cfg.vision.layers, cfg.qformer.hidden_size, cfg.text["hidden_size"])
    assert shape == (1408, 39, 768, 2560)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(3.745e9, rel=1e-3)
