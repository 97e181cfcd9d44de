"""docs/rewriter.md's example, shipped as a plugin through the graphopt.passes entry point."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx

from graphopt.cli import main
from graphopt.pipeline import refresh_plugins, unregister_pass
from tests.helpers import parse, run

DOC = Path(__file__).resolve().parents[2] / "docs" / "rewriter.md"

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[8] x, float[8] s) => (float[8] y, float[8] z) {
    c = Constant <value = float {4.0}> ()
    y = Div(x, c)
    z = Div(x, s)
}
"""


def install_doc_plugin(root: Path) -> None:
    code = "\n".join(re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S))
    package = root / "my_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rules.py").write_text(code)
    dist = root / "my_package-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-package\nVersion: 0.1\n")
    toml = tomllib.loads(re.search(r"```toml\n(.*?)```", DOC.read_text(), flags=re.S).group(1))
    entries = toml["project"]["entry-points"]["graphopt.passes"]
    lines = "".join(f"{name} = {target}\n" for name, target in entries.items())
    (dist / "entry_points.txt").write_text(f"[graphopt.passes]\n{lines}")


def test_documented_plugin_rule_runs_and_explains(tmp_path, monkeypatch, capsys):
    install_doc_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    refresh_plugins()
    try:
        source, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
        onnx.save(parse(MODEL), source)
        args = ["optimize", str(source), "-o", str(out), "--passes", "lift-constants,simplify-divisions",
                "--explain", "div-by-constant", "--verify", "--json"]
        assert main(args) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["pipeline"]["passes"]["simplify-divisions"]["changes"] == 1
        (why,) = report["explain"]  # the remaining Div reads a graph input, not a constant
        assert "expected a constant, got 's'" in why["reason"]
        assert sorted(n.op_type for n in onnx.load(out).graph.node) == ["Div", "Mul"]
        feeds = {"x": np.linspace(-2, 2, 8, dtype=np.float32), "s": np.full(8, 4, np.float32)}
        for a, b in zip(run(parse(MODEL), feeds), run(str(out), feeds), strict=True):
            np.testing.assert_array_equal(a, b)
    finally:
        unregister_pass("simplify-divisions")
        for name in ("my_package", "my_package.rules"):
            sys.modules.pop(name, None)
