"""The interleaved timing loop the benchmarks and the timing passes share (graphopt/timing.py)."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from graphopt.timing import interleaved_ratios, measure_interleaved, raise_failures
from tools.bench.pairing import paired_ratio


def test_every_variant_takes_every_place_in_the_round():
    order: list[str] = []
    variants = {name: (lambda n=name: order.append(n)) for name in "abc"}
    stats = measure_interleaved(variants, runs=6, warmup=0, block_ms=0)
    order = order[6:]  # the calls that sized the blocks (two each)
    rounds = [order[i:i + 3] for i in range(0, 18, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    places = Counter((i, name) for r in rounds for i, name in enumerate(r))
    assert places == Counter({(i, name): 2 for i in range(3) for name in "abc"})
    assert all(s.runs == 6 for s in stats.values())


def test_a_failing_variant_is_dropped_and_the_others_stay_paired():
    calls = Counter()

    def broken() -> None:
        calls["broken"] += 1
        if calls["broken"] > 3:
            raise RuntimeError("gone")

    stats = measure_interleaved({"base": lambda: None, "broken": broken, "other": lambda: None}, runs=5, warmup=1)
    assert stats["broken"].error == "RuntimeError: gone"
    assert stats["base"].runs == stats["other"].runs == 5
    assert paired_ratio(stats["other"].samples_ms, stats["base"].samples_ms) is not None


def test_a_round_times_a_warm_block_not_the_call_after_a_switch():
    """A model whose first call after another model is slow (cold caches) is timed as it runs in a loop."""
    last = [""]

    def variant(name: str, warm_s: float, switch_s: float):
        def call() -> None:
            time.sleep(warm_s + (switch_s if last[0] != name else 0.0))
            last[0] = name
        return call

    # block_ms well above the fast call and below the slow one, so a loaded machine's late wake-ups
    # do not change either variant's block size
    stats = measure_interleaved({"fast": variant("fast", 0.0002, 0.004), "slow": variant("slow", 0.030, 0.0)},
                                runs=5, warmup=1, block_ms=20.0)
    assert stats["fast"].median_ms < 2.0  # the 4 ms switch-in call is neither the sample nor sizes the block
    assert 30.0 <= stats["slow"].median_ms < 45.0  # slower than a block: one call per round


def test_tools_that_need_every_variant_raise_the_recorded_failure():
    def broken() -> None:
        raise ValueError("no kernel")

    stats = measure_interleaved({"ok": lambda: None, "broken": broken}, runs=2, warmup=1)
    raise_failures({"ok": stats["ok"]})  # nothing failed: no error
    with pytest.raises(RuntimeError, match="broken.*ValueError: no kernel"):
        raise_failures(stats)


class _Sleeper:
    """A stand-in session whose run takes ``seconds`` (or raises when ``seconds`` is None)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds

    def run(self, names, feed):
        if self.seconds is None:
            raise ValueError("bad model")
        time.sleep(self.seconds)


def test_interleaved_ratios_are_against_the_first_session_and_a_failure_raises():
    ratios, ms = interleaved_ratios([_Sleeper(0.004), _Sleeper(0.008), _Sleeper(0.004)], {}, seconds=0.3)
    assert ratios[0] == 1.0
    assert 1.6 < ratios[1] < 2.4 and 0.7 < ratios[2] < 1.4
    assert 4.0 <= ms[0] < 8.0 and 8.0 <= ms[1] < 16.0
    with pytest.raises(RuntimeError, match="ValueError: bad model"):
        interleaved_ratios([_Sleeper(0.001), _Sleeper(None)], {}, seconds=0.1)
