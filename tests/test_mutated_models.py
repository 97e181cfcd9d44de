"""Zoo models with random defects (an op type swapped, an input dropped, an attribute of the wrong type or
value, an initializer's dims, type or data changed, a node removed, ...) through every command: each must
succeed or print one clear error (exit 1 or 2), never a traceback, never touch its input or leave a partial
output. Session 21's run of 2000 such cases found nine kinds of tracebacks (tests/test_bad_input.py names them)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import random

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.cli import main
from graphopt.verify import generate_inputs

OPS = ["Relu", "Add", "MatMul", "Conv", "Reshape", "Transpose", "Gemm", "Softmax", "Concat", "Gather", "Slice",
       "Cast", "Shape", "Unsqueeze", "LayerNormalization", "Where", "NotAnOp", "Split", "MaxPool", "Flatten"]


def mutate(model: onnx.ModelProto, rng: random.Random) -> str:
    """Apply one random defect in place; returns what it did."""
    graph, nodes = model.graph, list(model.graph.node)
    node = rng.choice(nodes)
    kind = rng.choice(["op", "drop_input", "bogus_input", "attr_value", "attr_type", "init_dims", "init_type",
                       "init_data", "swap_inputs", "opset", "drop_output", "input_dim", "dup_output", "drop_node",
                       "domain", "input_type"])
    init = rng.choice(list(graph.initializer)) if graph.initializer else None
    if kind == "op":
        node.op_type = rng.choice(OPS)
    elif kind == "drop_input" and node.input:
        del node.input[rng.randrange(len(node.input))]
    elif kind == "bogus_input":
        node.input.append(rng.choice(["nowhere", graph.input[0].name, ""]))
    elif kind == "attr_value" and node.attribute:
        attr = rng.choice(list(node.attribute))
        if attr.type == onnx.AttributeProto.INT:
            attr.i = rng.choice([-1, 0, 7, 10**9])
        elif attr.type == onnx.AttributeProto.INTS:
            attr.ints[:] = rng.choice([[], [0], [-1, 5], [10**9] * 4])
        elif attr.type == onnx.AttributeProto.FLOAT:
            attr.f = rng.choice([float("nan"), float("inf"), -1.0])
    elif kind == "attr_type" and node.attribute:
        attr = rng.choice(list(node.attribute))
        node.attribute.remove(attr)
        node.attribute.append(helper.make_attribute(attr.name, rng.choice(["x", 1.5, [1, 2], 3])))
    elif kind == "init_dims" and init is not None and init.dims:
        init.dims[rng.randrange(len(init.dims))] = rng.choice([0, 1, 3, 10**6])
    elif kind == "init_type" and init is not None:
        init.data_type = rng.choice([TensorProto.DOUBLE, TensorProto.INT8, TensorProto.STRING, 0, 99])
    elif kind == "init_data" and init is not None and init.raw_data:
        init.raw_data = init.raw_data[: len(init.raw_data) // 2]
    elif kind == "swap_inputs" and len(node.input) > 1:
        node.input[0], node.input[1] = node.input[1], node.input[0]
    elif kind == "opset":
        model.opset_import[0].version = rng.choice([1, 6, 30])
    elif kind == "drop_output":
        del graph.output[0]
    elif kind == "input_dim":
        dims = graph.input[0].type.tensor_type.shape.dim
        dims[rng.randrange(len(dims))].dim_value = rng.choice([0, 10**8])
    elif kind == "dup_output" and len(nodes) > 1:
        rng.choice(nodes).output[0] = node.output[0]
    elif kind == "drop_node":
        graph.node.remove(node)
    elif kind == "domain":
        node.domain = rng.choice(["com.microsoft", "bogus.domain"])
    elif kind == "input_type":
        graph.input[0].type.tensor_type.elem_type = rng.choice([TensorProto.STRING, TensorProto.DOUBLE, 0])
    return f"{kind} at {node.name or node.op_type}"


def commands(path: str, out: str, calib: str) -> dict[str, list[str]]:
    return {"optimize": ["optimize", path, "-o", out, "--verify"], "verify": ["verify", path, path],
            "prune": ["prune", path, "-o", out, "--ratio", "0.3"],
            "quantize": ["quantize", path, "-o", out, "--calib", calib, "--no-latency-aware"]}


@pytest.mark.parametrize("name", ["digits_cnn_torchscript", "bert_dynamo"])
def test_defective_models_get_one_clear_error_or_run(zoo, name, tmp_path):
    source = onnx.load(str(zoo.build(name)))
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{k: v[None] for k, v in generate_inputs(source).items()})
    failures = []
    for case in range(60):
        rng = random.Random(case)
        model = copy.deepcopy(source)
        what = [mutate(model, rng) for _ in range(rng.choice([1, 2]))]
        path, out = tmp_path / f"m{case}.onnx", tmp_path / f"o{case}.onnx"
        path.write_bytes(model.SerializeToString())
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        command, argv = rng.choice(list(commands(str(path), str(out), str(calib)).items()))
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                code = main(argv)
        except Exception as exc:  # noqa: BLE001 - any exception escaping main is what this test looks for
            failures.append((case, command, what, f"{type(exc).__name__}: {exc}"))
            continue
        if code not in (0, 1, 2) or (code == 2 and "error:" not in err.getvalue()) \
                or hashlib.sha256(path.read_bytes()).hexdigest() != digest or (code == 2 and out.exists()):
            failures.append((case, command, what, code, err.getvalue()[:200]))
    assert not failures, failures
