"""Benchmark JSON files stay strict JSON: non-finite timings (a failed variant) are written as strings."""

import json
import math

from tools.bench.results import write_json


def test_non_finite_floats_become_strings_at_any_depth(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"ratio": math.inf, "rows": [{"ms": math.nan, "ok": 1.5}], "pair": (2.0, -math.inf)})
    data = json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert data == {"ratio": "inf", "rows": [{"ms": "nan", "ok": 1.5}], "pair": [2.0, "-inf"]}
