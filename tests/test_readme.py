"""The README's pass example is real code: it runs and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import graphopt
from graphopt.optimize import optimize
from graphopt.pipeline import unregister_pass
from tests.helpers import parse, run

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_writing_a_pass_example():
    block = next(b for b in python_blocks() if "register_pass" in b)
    namespace: dict = {}
    exec(block, namespace)  # noqa: S102 - our own README
    try:
        original = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3] x) => (float[3] y) {
            a = Neg(x)
            b = Neg(a)
            y = Relu(b)
        }
        """)
        model = graphopt.load(original)
        result = optimize(model, ["remove-double-neg", "eliminate-dead-nodes"])
        assert [n.op_type for n in model.graph] == ["Relu"]
        assert result.pipeline.stats["remove-double-neg"].changes == 1
        x = {"x": np.array([-1.0, 0.0, 2.0], np.float32)}
        np.testing.assert_array_equal(run(original, x)[0], run(graphopt.to_bytes(model), x)[0])
    finally:
        unregister_pass("remove-double-neg")
