"""A deep synthetic transformer-like model for scale tests: ~N nodes, small weights, work for every pass.

Each block is pre-LayerNorm attention plus an MLP, written the way exporters write them, with the
redundancy simplifiers exist for: a no-op Cast and a float->double->float round trip, duplicate
``Constant`` shape tensors (CSE), a scale computed from constants (folding), a Shape->Gather->Concat chain
whose static half folds, an identity Transpose, Identity and inference Dropout, and x*1 / x+0. Weights are
8x8 and 8x16 so a 200k-node model stays small on disk and fast to run; the batch dim is symbolic.

    python -m tools.bench.synthetic 200000 /tmp/synthetic.onnx
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

SEQ, HIDDEN, HEADS, FFN = 4, 8, 2, 16
OPSET = 17  # LayerNormalization
IR_VERSION = 8  # old enough for every peer tool


@dataclass
class _Block:
    """Collects one block's nodes and initializers under a unique prefix."""

    prefix: str
    rng: np.random.Generator
    nodes: list[onnx.NodeProto]
    inits: list[onnx.TensorProto]

    def name(self, what: str) -> str:
        return f"{self.prefix}{what}"

    def op(self, op_type: str, inputs: list[str], what: str, **attrs: object) -> str:
        out = self.name(what)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def const(self, what: str, value: np.ndarray) -> str:
        """A ``Constant`` node (exporters emit these; folding and CSE should see through them)."""
        out = self.name(what)
        self.nodes.append(helper.make_node("Constant", [], [out], name=out, value=numpy_helper.from_array(value)))
        return out

    def weight(self, what: str, *shape: int, scale: float = 1.0) -> str:
        value = (self.rng.standard_normal(shape) * scale / math.sqrt(shape[0])).astype(np.float32)
        self.inits.append(numpy_helper.from_array(value, self.name(what)))
        return self.name(what)


def _attention(b: _Block, x: str) -> str:
    heads = []
    for which, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        proj = b.op("Add", [b.op("MatMul", [x, b.weight(f"W{which}", HIDDEN, HIDDEN)], f"{which}_mm"),
                            b.weight(f"b{which}", HIDDEN, scale=0.1)], f"{which}_proj")
        shape = b.const(f"{which}_shape", np.array([0, 0, HEADS, HIDDEN // HEADS], np.int64))  # duplicates
        heads.append(b.op("Transpose", [b.op("Reshape", [proj, shape], f"{which}_4d")], f"{which}_t", perm=perm))
    q, k, v = heads
    two = b.const("c_two", np.array(2.0, np.float32))
    half = b.const("c_half", np.array(HIDDEN // HEADS / 2, np.float32))
    scale = b.op("Sqrt", [b.op("Mul", [two, half], "scale_sq")], "scale")  # = sqrt(head_dim), foldable
    scores = b.op("Div", [b.op("MatMul", [q, k], "scores_raw"), scale], "scores")
    probs = b.op("Dropout", [b.op("Softmax", [scores], "probs_raw", axis=-1)], "probs")
    ctx = b.op("Transpose", [b.op("MatMul", [probs, v], "ctx_4d")], "ctx_t", perm=[0, 2, 1, 3])
    ctx = b.op("Transpose", [ctx], "ctx_noop", perm=[0, 1, 2, 3])
    return b.op("Reshape", [ctx, _dynamic_shape(b, x)], "ctx")


def _dynamic_shape(b: _Block, x: str) -> str:
    """[batch, seq, hidden] computed the way tracing exporters do: only the batch part stays dynamic."""
    shape = b.op("Shape", [x], "shape")
    axis0 = b.const("axis0", np.array([0], np.int64))
    dims = [
        b.op("Unsqueeze", [b.op("Gather", [shape, b.const(f"i{i}", np.array(i, np.int64))], f"dim{i}"), axis0],
             f"dim{i}_1d")
        for i in (0, 1)
    ]
    return b.op("Concat", [*dims, b.const("hidden", np.array([HIDDEN], np.int64))], "ctx_shape", axis=0)


def _block(b: _Block, x: str) -> str:
    same = b.op("Cast", [x], "cast_noop", to=TensorProto.FLOAT)
    wide = b.op("Cast", [same], "cast_wide", to=TensorProto.DOUBLE)
    h = b.op("Cast", [wide], "cast_back", to=TensorProto.FLOAT)
    ln1 = b.op("LayerNormalization", [h, b.weight("ln1_g", HIDDEN, scale=math.sqrt(HIDDEN)),
                                      b.weight("ln1_b", HIDDEN, scale=0.1)], "ln1", axis=-1)
    attn = b.op("Add", [b.op("MatMul", [_attention(b, ln1), b.weight("Wo", HIDDEN, HIDDEN, scale=0.3)], "o_mm"),
                        b.weight("bo", HIDDEN, scale=0.1)], "o_proj")
    x = b.op("Add", [h, b.op("Identity", [attn], "o_id")], "res1")
    ln2 = b.op("LayerNormalization", [x, b.weight("ln2_g", HIDDEN, scale=math.sqrt(HIDDEN)),
                                      b.weight("ln2_b", HIDDEN, scale=0.1)], "ln2", axis=-1)
    up = b.op("Relu", [b.op("Add", [b.op("MatMul", [ln2, b.weight("W1", HIDDEN, FFN)], "up_mm"),
                                    b.weight("b1", FFN, scale=0.1)], "up")], "act")
    down = b.op("Add", [b.op("MatMul", [up, b.weight("W2", FFN, HIDDEN, scale=0.3)], "down_mm"),
                        b.weight("b2", HIDDEN, scale=0.1)], "down")
    down = b.op("Mul", [b.op("Dropout", [down], "down_drop"), b.const("one", np.array(1.0, np.float32))], "times1")
    down = b.op("Add", [down, b.const("zero", np.zeros(HIDDEN, np.float32))], "plus0")
    return b.op("Add", [x, down], "res2")


def nodes_per_block() -> int:
    b = _Block("", np.random.default_rng(0), [], [])
    _block(b, "x")
    return len(b.nodes)


def transformer_stack(target_nodes: int = 200_000, seed: int = 0) -> onnx.ModelProto:
    """A model with about ``target_nodes`` nodes (whole blocks, at least one): input ``x`` [batch, 4, 8]."""
    blocks = max(1, round(target_nodes / nodes_per_block()))
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "x"
    for i in range(blocks):
        x = _block(_Block(f"b{i}/", rng, nodes, inits), x)
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    graph = helper.make_graph(
        nodes, "synthetic_transformer_stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SEQ, HIDDEN])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="graphopt-bench-synthetic")
    log.info("synthetic model: %d blocks, %d nodes, %d initializers", blocks, len(nodes), len(inits))
    return model


def synthetic_inputs(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, SEQ, HIDDEN)).astype(np.float32)}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    onnx.save(transformer_stack(int(sys.argv[1])), sys.argv[2])
