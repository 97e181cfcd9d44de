"""Shared helpers of the fusion tests (models from ONNX text plus random weights, checks against
onnxruntime), and tests of the per-channel helpers in ``passes/fusion/channels.py``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

import graphopt
from graphopt.ir import Model, verify
from graphopt.passes.fusion.channels import channel_vector
from graphopt.rewrite import RewritePass
from graphopt.verify import verify_models

RTOL = 1e-4


def model_from(text: str, weights: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A model from ONNX text whose nodes may read ``weights`` (added as initializers) by name.

    An output written without dims (``float y``) gets an unknown shape rather than a scalar's.
    """
    proto = onnx.parser.parse_model(text)
    unshaped = [out for out in proto.graph.output if not out.type.tensor_type.shape.dim]
    for out in unshaped:
        out.type.tensor_type.ClearField("shape")
    for name, array in (weights or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    if unshaped:
        proto = onnx.shape_inference.infer_shapes(proto)
        del proto.graph.value_info[:]  # keep the graph as written: passes must not rely on inferred types
    onnx.checker.check_model(proto, full_check=True)
    return proto


def rand(*shape: int, seed: int = 0, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def positive(*shape: int, seed: int = 0) -> np.ndarray:
    return rand(*shape, seed=seed, low=0.5, high=2.0)


def optimized(proto: onnx.ModelProto, passes: Sequence[str]) -> Model:
    """``passes`` between lift-constants and the cleanups, as the zoo pipelines run them."""
    model = graphopt.load(proto)
    graphopt.optimize(model, ["lift-constants", *passes, "eliminate-dead-nodes", "remove-unused-initializers"])
    verify(model)
    return model


def ops(model: Model) -> list[str]:
    return [n.op_type for n in model.graph]


def assert_same_outputs(original: onnx.ModelProto | str, model: Model, feeds: Mapping[str, np.ndarray]) -> None:
    """Both models in onnxruntime (CPU, ORT_DISABLE_ALL) agree within float noise (rtol 1e-4 elementwise)."""
    report = verify_models(original, graphopt.to_bytes(model), inputs=dict(feeds), rtol=RTOL)
    assert report.ok, report
    runs_in_ort(model, feeds)


def runs_in_ort(model: Model, feeds: Mapping[str, np.ndarray]) -> None:
    """The optimized model loads and runs at onnxruntime's highest level too (only ops it implements)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(graphopt.to_bytes(model), so, providers=["CPUExecutionProvider"])
    session.run(None, dict(feeds))


def reason(model: Model, pass_cls: type[RewritePass], rule: str) -> str:
    """The reason ``rule`` gives for its (single) candidate."""
    explained = [e for e in pass_cls.rules.explain(model, rule) if not e.matches]
    assert explained, f"{rule} matches everywhere"
    return " | ".join(e.reason for e in explained)


def not_fired(proto: onnx.ModelProto, pass_cls: type[RewritePass], rule: str) -> str:
    """Run ``pass_cls`` on ``proto``; assert nothing changed and return why ``rule`` refused."""
    model = optimized(proto, [])
    before = ops(model)
    assert pass_cls.rules.apply(model) == {}
    assert ops(model) == before
    return reason(model, pass_cls, rule)


# -- channels.py -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "rank", "expected"), [
    ((), 4, [0, 0, 0]),
    ((1,), 4, [0, 0, 0]),
    ((3, 1, 1), 4, [0, 1, 2]),
    ((1, 3, 1, 1), 4, [0, 1, 2]),
    ((1, 1, 1, 1), 4, [0, 0, 0]),
])
def test_channel_vector_accepts_per_channel_shapes(shape, rank, expected):
    assert list(channel_vector(shape, rank, 3, axis=1)) == expected


@pytest.mark.parametrize(("shape", "rank", "axis", "why"), [
    ((3,), 4, 1, "varies along axis 3"),  # [3] broadcasts along the last axis, not the channels
    ((1, 3, 2, 1), 4, 1, "varies along axis 2"),
    ((2, 3, 1, 1), 4, 1, "varies along axis 0"),
    ((1, 1, 3, 1, 1), 4, 1, "more dimensions than the output"),
    ((1, 3), None, -1, "output rank is unknown"),
    ((1, 2, 1, 1), 4, 1, "2 elements on the channel axis"),
])
def test_channel_vector_refuses_other_shapes(shape, rank, axis, why):
    result = channel_vector(shape, rank, 3, axis=axis)
    assert isinstance(result, str) and why in result


@pytest.mark.parametrize(("body", "expected"), [
    ("y = ConstantOfShape <value = float[1] {0.5}> (s)", 0.5),
    ("y = ConstantOfShape (s)", 0.0),
    ("e = Expand (twos, s)\n y = Reshape (e, flat)", 2.0),
    ("c = Expand (trues, s)\n y = Where (c, twos, x)", 2.0),  # the condition decides: x never read
    ("y = Where (x_pos, twos, twos)", 2.0),  # both branches equal
    ("y = Where (x_pos, twos, x)", None),
    ("y = Expand (ramp, s)", None),  # a constant whose elements differ
    ("y = Relu (twos)", None),  # an op that computes is not followed
])
def test_uniform_value(body, expected):
    from graphopt.passes.fusion.norm import uniform_value
    model = graphopt.load(model_from(f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x, int64[2] s, bool[2, 3] x_pos) => (float y) {{ {body} }}""", {
        "twos": np.full((1, 3), 2, np.float32), "trues": np.ones((1, 1), bool), "ramp": np.arange(3, dtype=np.float32),
        "flat": np.array([-1])}))
    (y,) = model.graph.outputs
    assert uniform_value(y) == expected
