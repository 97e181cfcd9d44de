"""ONNX ops that draw random numbers: never folded or merged, and seeded when two models are compared.

onnxruntime seeds a random op that sets no ``seed`` from a process-wide value (the clock at start-up)
plus the node's index in its graph, so such a model draws other numbers in every process, and a
rewritten graph, whose nodes sit at other indices, draws other numbers than the original even with
``onnxruntime.set_seed``. Comparing two models therefore gives each unseeded random op a seed derived
from its name (:func:`seed_value`), the same in both.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

RANDOM_OPS = frozenset({
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial",
})
MAY_DRAW_RANDOM = RANDOM_OPS | {"Dropout"}  # Dropout draws in training mode, which its third input switches on


def draws_random(op_type: str, domain: str, inputs: Sequence[object]) -> bool:
    """Whether a node may draw random numbers (``inputs``: names or graphopt Values, missing ones falsy)."""
    if domain not in ("", "ai.onnx"):
        return False
    return op_type in RANDOM_OPS or (op_type == "Dropout" and len(inputs) > 2 and bool(inputs[2]))


def seed_value(op_type: str, name: str, first_output: str) -> int | float:
    """A seed derived from the node's name (its first output's if it has none): an int for Dropout's
    attribute, a float (exact below 2**24) for the others'."""
    value = zlib.crc32((name or first_output).encode()) % 2**24
    return value if op_type == "Dropout" else float(value)
