"""Smoke test of the simplification benchmark: one tiny hand-built model, graphopt and one peer.

Checks the shape of a result (what the report and the JSON rely on), not the numbers.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tests.helpers import parse
from tools.bench.results import write_json
from tools.bench_simplify import BenchConfig, bench_model, render_markdown, summarize

TINY = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
    i = Identity(x)
    one = Constant <value_float = 1.0> ()
    a = Add(i, one)
    d = Dropout(a)
    y = Relu(d)
}
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("bench")
    path = folder / "tiny.onnx"
    onnx.save(parse(TINY), str(path))
    rng = np.random.default_rng(0)
    feeds = {"primary": {"x": rng.standard_normal((2, 4), dtype=np.float32)},
             "second": {"x": rng.standard_normal((5, 4), dtype=np.float32)}}
    cfg = BenchConfig(tools=("onnxoptimizer", "graphopt"), repeat=1, timeout=120, check_timeout=120,
                      latency_runs=2, warmup=1)
    return bench_model("tiny", path, feeds, folder / "work", cfg)


def test_every_variant_is_measured(result):
    assert set(result["variants"]) == {"original", "onnxoptimizer", "graphopt"}
    for label, variant in result["variants"].items():
        assert variant["ok"], (label, variant["error"])
        stats = variant["stats"]
        assert isinstance(stats["nodes"], int) and isinstance(stats["nodes_total"], int)
        assert stats["nodes"] <= stats["nodes_total"] and stats["file_bytes"] > 0
        assert set(variant["match"]) == {"primary", "second"}
        assert variant["matched"] is True
        assert all(m["max_abs"] == 0.0 for m in variant["match"].values())
        for level in ("disable_all", "all"):
            assert variant["latency"][level]["median_ms"] > 0
    assert result["variants"]["original"]["stats"]["nodes"] == 5
    graphopt = result["variants"]["graphopt"]
    assert graphopt["stats"]["nodes"] < 5  # Identity and Dropout go even with only the cleanup passes
    assert graphopt["seconds_median"] > 0 and graphopt["peak_rss_mb"] > 0


def test_verdict_and_report(result, tmp_path):
    verdict = result["verdict"]["graphopt"]
    assert isinstance(verdict["le_peers"], bool) and isinstance(verdict["strictly_lower"], bool)
    assert verdict["matched"] is True and verdict["peers_ok_but_failed"] == []
    summary = summarize([result])
    assert "graphopt: outputs match on 1/1 (primary and second shape)" in summary["lines"]
    markdown = render_markdown([result], summary, None)
    assert "| tiny " in markdown and "graphopt" in markdown
    out = tmp_path / "out.json"
    write_json(str(out), {"models": [result], "summary": summary})
    assert json.loads(out.read_text())["models"][0]["model"] == "tiny"


def test_a_crashing_tool_costs_one_cell(tmp_path):
    from tools.bench.child import run_in_child

    res = run_in_child("os:abort", timeout=60)
    assert not res.ok and "SIGABRT" in res.error
    res = run_in_child("subprocess:call", {"args": ["sleep", "30"]}, timeout=2)  # its process group dies too
    assert not res.ok and res.timed_out


def _variant(nodes: int, ok: bool = True, matched: bool = True) -> dict:
    return {"ok": ok, "matched": matched, "stats": {"nodes_total": nodes}}


def test_verdict_counts_only_peers_that_succeeded_and_matched():
    from tools.bench_simplify import verdict

    variants = {"original": _variant(9), "onnxsim": _variant(3, matched=False), "onnxslim": _variant(5),
                "graphopt": _variant(4)}
    v = verdict(variants, "graphopt")
    assert v["peer_min_nodes"] == 5 and v["min_tools"] == ["graphopt"]
    assert v["le_peers"] and v["strictly_lower"]
    variants["graphopt"] = _variant(4, ok=False)
    v = verdict(variants, "graphopt")
    assert not v["le_peers"] and v["peers_ok_but_failed"] == ["onnxslim"]
