"""Tests for graphopt.verify: inputs, the tolerance rule, bisection and the report."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from rich.console import Console

from graphopt.verify import (
    VerificationError,
    compare_outputs,
    compare_values,
    find_divergence,
    generate_inputs,
    load_inputs,
    reference_outputs,
    render_report,
    run_model,
    verify_models,
)
from graphopt.verify.bisect import topological_order
from graphopt.verify.precision import computed_in
from graphopt.verify.runtime import LoadedModel, load_model, open_session, run_session

HEADER = '<ir_version: 10, opset_import: ["" : 18]>\n'


def parse(text: str, **initializers: np.ndarray) -> onnx.ModelProto:
    """A model from ONNX text, nodes named n1, n2, ... and numpy initializers added."""
    model = onnx.parser.parse_model(HEADER + text)
    for i, node in enumerate(model.graph.node, start=1):
        node.name = f"n{i}"
    for name, value in initializers.items():
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.checker.check_model(model)
    return model


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


LINEAR = "g (float[batch, 8] x) => (float[batch, 4] y) { h = MatMul(x, w)\n y = Add(h, b) }"


def linear(w: np.ndarray | None = None, b: np.ndarray | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 4)).astype(np.float32) if w is None else w
    b = np.linspace(-1, 1, 4, dtype=np.float32) if b is None else b
    return parse(LINEAR, w=w, b=b)


# ---------------------------------------------------------------- identical models


@pytest.mark.parametrize("form", ["proto", "bytes", "path"])
def test_identical_models_match(form: str, tmp_path) -> None:
    model = linear()
    if form == "bytes":
        model = model.SerializeToString()
    elif form == "path":
        onnx.save(model, tmp_path / "m.onnx")
        model = str(tmp_path / "m.onnx")
    report = verify_models(model, model)
    assert report.ok and report.error is None and report.divergence is None
    assert [(o.name, o.verdict, o.max_abs) for o in report.outputs] == [("y", "match", 0.0)]
    assert report.input_shapes == {"x": [1, 8]} and report.seed == 0


# ---------------------------------------------------------------- float noise vs real breakage

SUM_LEFT = "g (float[n] a, float[n] b, float[n] c) => (float[n] y) { ab = Add(a, b)\n y = Add(ab, c) }"
SUM_RIGHT = "g (float[n] a, float[n] b, float[n] c) => (float[n] y) { bc = Add(b, c)\n y = Add(a, bc) }"


def test_reassociated_sum_is_float_noise() -> None:
    rng = np.random.default_rng(0)
    # many elements, so that some sums land near 0, where reassociation breaks any elementwise rtol
    inputs = {k: (rng.standard_normal(1 << 16) * 1000).astype(np.float32) for k in "abc"}
    left, right = parse(SUM_LEFT), parse(SUM_RIGHT)
    y1, y2 = run_model(left, inputs)["y"], run_model(right, inputs)["y"]
    assert not np.allclose(y1, y2, rtol=1e-6, atol=0)
    report = verify_models(left, right, inputs=inputs)
    assert report.ok
    assert report.outputs[0].verdict == "float_noise"  # the default elementwise check alone fails too
    assert report.outputs[0].mismatched > 0
    # the noise rule is what makes it pass
    assert verify_models(left, right, inputs=inputs, noise=0).outputs[0].verdict == "mismatch"


SPLIT_MATMUL = """g (float[m, 512] x) => (float[m, 16] y) {
  x1, x2 = Split<axis = 1>(x, sizes)
  w1, w2 = Split<axis = 0>(w, sizes)
  y1 = MatMul(x1, w1)
  y2 = MatMul(x2, w2)
  y = Add(y1, y2)
}"""


def test_matmul_split_in_halves_is_ok_where_allclose_fails() -> None:
    w = np.random.default_rng(2).standard_normal((512, 16)).astype(np.float32)
    whole = parse("g (float[m, 512] x) => (float[m, 16] y) { y = MatMul(x, w) }", w=w)
    split = parse(SPLIT_MATMUL, w=w, sizes=np.array([200, 312], np.int64))  # not at a kernel block edge
    inputs = {"x": (np.random.default_rng(3).standard_normal((32, 512)) * 100).astype(np.float32)}
    y1, y2 = run_model(whole, inputs)["y"], run_model(split, inputs)["y"]
    assert not np.allclose(y1, y2, rtol=1e-6, atol=0)
    report = verify_models(whole, split, inputs=inputs, rtol=1e-6, atol=0.0)
    assert report.ok, report.summary()
    assert report.outputs[0].verdict == "float_noise"
    assert report.outputs[0].tolerance_used.rtol == 1e-6


def _scaled(factor: float) -> onnx.ModelProto:
    return parse("g (float[batch, 8] x) => (float[batch, 8] y) { y = Mul(x, s) }", s=f32(0.5 * factor))


def _swapped_channels() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    base = linear()
    w = numpy_helper.to_array(base.graph.initializer[0])
    return base, linear(w=w[:, [1, 0, 2, 3]])


def _wrong_bias() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    b = np.linspace(-1, 1, 4, dtype=np.float32)
    b2 = b.copy()
    b2[2] += 0.01
    return linear(b=b), linear(b=b2)


@pytest.mark.parametrize(
    ("pair", "diverging"),
    [(lambda: (_scaled(1.0), _scaled(1.01)), "y"), (_wrong_bias, "y"), (_swapped_channels, "h")],
    ids=["constant-1e-2-relative", "wrong-bias", "swapped-channels"],
)
def test_small_real_change_is_mismatch(pair, diverging: str) -> None:
    original, candidate = pair()
    report = verify_models(original, candidate, shapes={"x": [16, 8]})
    assert not report.ok
    assert report.outputs[0].verdict == "mismatch"
    assert report.divergence is not None and report.divergence.value == diverging


# ---------------------------------------------------------------- bisection

CHAIN = """g (float[batch, 4] x) => (float[batch, 4] y) {
  t1 = Add(x, c1)
  t2 = Mul(t1, c2)
  t3 = Sub(t2, c3)
  t4 = Tanh(t3)
  t5 = Mul(t4, c5)
  y = Add(t5, c6)
}"""


def chain(c3: float = 0.25) -> onnx.ModelProto:
    consts = {f"c{i}": f32(0.1 * i, -0.2, 0.3, 1.0) for i in (1, 2, 5, 6)}
    return parse(CHAIN, c3=f32(c3, 0.5, -0.5, 0.0), **consts)


@pytest.mark.parametrize("chunk_size", [512, 2])
def test_bisect_finds_first_diverging_node(chunk_size: int) -> None:
    original, candidate = load_model(chain()), load_model(chain(c3=0.3))
    inputs = generate_inputs(original, {"x": [3, 4]})
    divergence, compared = find_divergence(original, candidate, inputs, inputs, chunk_size=chunk_size)
    assert divergence is not None
    assert (divergence.node, divergence.op_type, divergence.value) == ("n3", "Sub", "t3")
    assert divergence.verdict == "mismatch" and divergence.max_abs == pytest.approx(0.05, rel=1e-4)
    assert compared == 3


def test_bisect_skips_values_only_one_graph_has() -> None:
    original = chain()
    candidate = chain()
    # the candidate computes t2 through a differently named value (t1 is gone) and breaks t4
    candidate.graph.node[0].output[0] = "fused_tmp"
    candidate.graph.node[1].input[0] = "fused_tmp"
    candidate.graph.node[3].op_type = "Abs"
    report = verify_models(original, candidate)
    assert not report.ok
    div = report.divergence
    assert (div.node, div.op_type, div.value, div.candidate_op_type) == ("n4", "Tanh", "t4", "Abs")
    assert div.compared == 3  # t2, t3, t4


def test_bisect_reports_shape_divergence_and_missing_output() -> None:
    original = parse("g (float[2, 3] x) => (float[2, 3] y) { t = Relu(x)\n y = Neg(t) }")
    candidate = parse("g (float[2, 3] x) => (float[6] y2) { t = Flatten<axis = 0>(x)\n y2 = Neg(t) }")
    report = verify_models(original, candidate)
    assert [o.verdict for o in report.outputs] == ["missing"]
    assert report.divergence.value == "t" and report.divergence.verdict == "shape_mismatch"


IF_MODEL = """g (float[2] x, bool c) => (float[2] y) {
  t = Relu(x)
  u = If (c) <then_branch = then_g () => (float[2] a) { k = Constant<value = float[1] {%s}>()
    a = Add(t, k) }, else_branch = else_g () => (float[2] b) { b = Neg(t) }>
  y = Mul(u, u)
}"""


def test_bisect_stops_at_the_if_node_whose_body_changed() -> None:
    inputs = {"x": f32(1.0, 2.0), "c": np.array(True)}
    report = verify_models(parse(IF_MODEL % "1.0"), parse(IF_MODEL % "1.5"), inputs=inputs)
    assert not report.ok
    assert (report.divergence.node, report.divergence.value, report.divergence.compared) == ("n2", "u", 2)


def test_topological_order_of_unsorted_nodes() -> None:
    graph = chain().graph
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(reversed(nodes))
    order = [graph.node[i].name for i in topological_order(graph)]
    assert order == ["n1", "n2", "n3", "n4", "n5", "n6"]


# ---------------------------------------------------------------- inputs

DYNAMIC = """g (int64[batch, seq] input_ids, int64[batch, seq] attention_mask, float[batch, seq, 4] h,
              float[unk, 3] z) => (int64[batch, seq] s, float[batch, seq, 4] y) {
  s = Add(input_ids, attention_mask)
  y = Relu(h)
}"""


def test_run_session_asked_for_nothing_runs_nothing_and_a_failed_run_names_the_inputs() -> None:
    """onnxruntime runs every output when given no names (a caller exposing no values once got them all)."""
    model = parse("g (float[N] x, int64[2] s) => (float[a, b] y) { y = Reshape(x, s) }")
    with open_session(LoadedModel(model), label="probe") as sess:
        assert run_session(sess, {"x": f32(1, 2, 3, 4), "s": np.array([2, 2])}, []) == {}
        assert run_session(sess, {"x": f32(1, 2, 3, 4), "s": np.array([2, 2])})["y"].shape == (2, 2)
        with pytest.raises(VerificationError, match=r"failed to run the probe on inputs x\[4\], s\[2\]"):
            run_session(sess, {"x": f32(1, 2, 3, 4), "s": np.array([3, 3])}, label="probe")


def test_outputs_computed_through_float16_are_judged_by_float16s_tolerance() -> None:
    """A float32 output that passes through float16 carries float16 rounding; an output that does not keeps
    float32's tolerance."""
    original = parse("g (float[64] x) => (float[64] y, float[64] z) {"
                     " h = Cast <to = 10> (x)\n y = Cast <to = 1> (h)\n z = Identity(x) }")
    candidate = parse("g (float[64] x) => (float[64] y, float[64] z) {"
                      " y = Identity(x)\n z = Mul(x, s) }", s=f32(1.0005))
    report = verify_models(original, candidate, bisect=False)
    verdicts = {d.name: d.verdict for d in report.outputs}
    assert verdicts == {"y": "match", "z": "mismatch"}, report.outputs
    assert "judged as float16" in report.outputs[0].detail
    assert computed_in(original) == {"y": np.dtype(np.float16)}


def test_dynamic_dims_bound_consistently() -> None:
    model = parse(DYNAMIC)
    model.graph.input[3].type.tensor_type.shape.dim[0].ClearField("dim_param")  # an unnamed dynamic dim
    default = generate_inputs(model)
    assert default["input_ids"].shape == default["attention_mask"].shape == (1, 8)
    assert default["h"].shape == (1, 8, 4) and default["z"].shape == (1, 3)
    given = generate_inputs(model, {"input_ids": [2, 5]})
    assert given["attention_mask"].shape == (2, 5) and given["h"].shape == (2, 5, 4)
    assert generate_inputs(model, dims={"seq": 3})["h"].shape == (1, 3, 4)
    report = verify_models(model, model, shapes={"h": [2, 7, 4]})
    assert report.ok and report.input_shapes["input_ids"] == [2, 7]
    # --shape seq=6: a symbolic dim named like an input (as `graphopt compile --shape` always took it)
    assert generate_inputs(model, {"seq": [6], "input_ids": [3, 6]})["h"].shape == (3, 6, 4)


def test_conflicting_or_impossible_shapes_raise() -> None:
    model = parse(DYNAMIC)
    with pytest.raises(VerificationError, match="'seq'"):
        generate_inputs(model, {"input_ids": [2, 5], "h": [2, 6, 4]})
    with pytest.raises(VerificationError, match="'h'.*static"):
        generate_inputs(model, {"h": [2, 6, 5]})
    with pytest.raises(VerificationError, match="'nope', which is neither an input nor a symbolic dim") as err:
        generate_inputs(model, {"nope": [1]})
    assert "symbolic dims: batch, seq" in err.value.hint
    with pytest.raises(VerificationError, match="'seq'"):
        generate_inputs(model, {"seq": [6], "input_ids": [2, 5]})
    with pytest.raises(VerificationError, match="'seq'"):
        generate_inputs(model, {"seq": [6, 2]})


def test_unknown_rank_input_needs_a_shape() -> None:
    model = parse("g (float[2] x) => (float[2] y) { y = Relu(x) }")
    model.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(VerificationError, match="'x' has unknown rank"):
        generate_inputs(model)
    assert generate_inputs(model, {"x": [2]})["x"].shape == (2,)


GATHER = """g (int64[batch, seq] ids, int32[batch, seq] token_type_ids, int64[batch, seq] big_ids,
              int64[batch, seq] attention_mask) => (float[batch, seq, 2] y, int64[batch, seq] m) {
  e = Gather(table, ids)
  tt64 = Cast<to = 7>(token_type_ids)
  tt = Unsqueeze(tt64, last)
  t = Gather(types, tt)
  ts = Squeeze(t, second_last)
  big = Gather<axis = 1>(wide, big_ids)
  bt = Transpose<perm = [1, 2, 0]>(big)
  s = Add(e, ts)
  y = Add(s, bt)
  m = Identity(attention_mask)
}"""


def gather_model() -> onnx.ModelProto:
    return parse(
        GATHER,
        table=np.ones((3, 2), np.float32),
        types=np.ones((2, 2), np.float32),
        wide=np.ones((2, 10), np.float32),
        last=np.array([-1], np.int64),
        second_last=np.array([-2], np.int64),
    )


def test_int_inputs_stay_in_valid_index_ranges() -> None:
    model = gather_model()
    inputs = generate_inputs(model, dims={"batch": 4, "seq": 16})
    assert inputs["ids"].dtype == np.int64 and 0 <= inputs["ids"].min() and inputs["ids"].max() < 3
    assert inputs["token_type_ids"].dtype == np.int32 and set(np.unique(inputs["token_type_ids"])) == {0, 1}
    assert inputs["big_ids"].max() < 8 and inputs["big_ids"].max() > 3  # default range, under the 10 columns
    mask = inputs["attention_mask"]
    assert set(np.unique(mask)) == {0, 1} and mask.mean() > 0.6 and (mask[:, 0] == 1).all()
    assert verify_models(model, model, dims={"batch": 4, "seq": 16}).ok  # onnxruntime accepts the indices


def test_value_ranges_override_and_seed_determinism() -> None:
    model = gather_model()
    fixed = generate_inputs(model, value_ranges={"ids": (2, 3)})
    assert (fixed["ids"] == 2).all()
    first, second = generate_inputs(model, seed=5), generate_inputs(model, seed=5)
    other = generate_inputs(model)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert not np.array_equal(first["big_ids"], other["big_ids"])


def test_user_inputs_missing_input_is_named(tmp_path) -> None:
    model = gather_model()
    inputs = generate_inputs(model)
    del inputs["token_type_ids"]
    with pytest.raises(VerificationError, match="missing input 'token_type_ids'"):
        verify_models(model, model, inputs=inputs)
    np.savez(tmp_path / "inputs.npz", **inputs)
    with pytest.raises(VerificationError, match="'token_type_ids'"):
        verify_models(model, model, inputs=load_inputs(tmp_path / "inputs.npz"))


def test_user_inputs_wrong_dtype_or_rank_is_named(tmp_path) -> None:
    model = gather_model()
    inputs = generate_inputs(model)
    with pytest.raises(VerificationError, match="'ids' has dtype int32, the model expects int64"):
        verify_models(model, model, inputs={**inputs, "ids": inputs["ids"].astype(np.int32)})
    with pytest.raises(VerificationError, match="'ids' has shape .*rank 3"):
        verify_models(model, model, inputs={**inputs, "ids": inputs["ids"][None]})
    with pytest.raises(VerificationError, match="'bogus'"):
        verify_models(model, model, inputs={**inputs, "bogus": inputs["ids"]})
    np.savez(tmp_path / "inputs.npz", **inputs)
    report = verify_models(model, model, inputs=tmp_path / "inputs.npz")
    assert report.ok and report.seed is None


def test_load_inputs_errors(tmp_path) -> None:
    with pytest.raises(VerificationError, match="does not exist"):
        load_inputs(tmp_path / "absent.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(VerificationError, match="single array"):
        load_inputs(tmp_path / "single.npy")


def test_bfloat16_inputs_and_outputs() -> None:
    model = parse("g (bfloat16[n] x) => (bfloat16[n] y) { f = Cast<to = 1>(x)\n y = Cast<to = 16>(f) }")
    inputs = generate_inputs(model)
    assert inputs["x"].dtype == ml_dtypes.bfloat16
    outputs = run_model(model, inputs)
    assert outputs["y"].dtype == ml_dtypes.bfloat16 and np.array_equal(outputs["y"], inputs["x"])
    assert verify_models(model, model).ok


# ---------------------------------------------------------------- exact dtypes, shapes, missing outputs


def test_string_and_bool_outputs_are_compared_exactly() -> None:
    text = "g (string[4] s, bool[4] b) => (string[4] t, bool[4] c) {{ t = Gather(s, {})\n c = {}(b) }}"
    same, reverse = np.arange(4), np.arange(4)[::-1].copy()
    original = parse(text.format("order", "Not"), order=same)
    inputs = {"s": np.array(["a", "b", "c", "d"]), "b": np.array([True, False, True, True])}
    assert verify_models(original, original, inputs=inputs).ok
    reversed_strings = parse(text.format("order", "Not"), order=reverse)
    flipped = parse(text.format("order", "Identity"), order=same)
    verdicts = {o.name: o.verdict for o in verify_models(original, reversed_strings, inputs=inputs).outputs}
    assert verdicts == {"t": "mismatch", "c": "match"}
    verdicts = {o.name: o.verdict for o in verify_models(original, flipped, inputs=inputs).outputs}
    assert verdicts == {"t": "match", "c": "mismatch"}


def test_int_outputs_are_exact() -> None:
    diff = compare_values("i", np.array([1, 2, 3]), np.array([1, 2, 4]))
    assert diff.verdict == "mismatch" and diff.max_abs == 1.0 and diff.mismatched == 1


def test_shape_mismatch_output() -> None:
    original = parse("g (float[2, 3] x) => (float[2, 3] y) { y = Relu(x) }")
    candidate = parse(
        "g (float[2, 3] x) => (float[1, 2, 3] y) { t = Relu(x)\n y = Unsqueeze(t, ax) }",
        ax=np.array([0], np.int64),
    )
    report = verify_models(original, candidate)
    assert not report.ok and report.outputs[0].verdict == "shape_mismatch"
    assert report.outputs[0].got_shape == [1, 2, 3]


def test_dtype_change_is_mismatch() -> None:
    diff = compare_values("y", np.ones(3, np.float32), np.ones(3, np.float16))
    assert diff.verdict == "mismatch" and "dtype float16" in diff.detail


def test_nan_and_inf_must_match_positions() -> None:
    ref = f32(1.0, np.nan, np.inf, -2.0)
    assert compare_values("y", ref, ref.copy()).verdict == "match"
    assert compare_values("y", ref, f32(1.0, 0.0, np.inf, -2.0)).verdict == "mismatch"
    assert compare_values("y", ref, f32(1.0, np.nan, -np.inf, -2.0)).verdict == "mismatch"


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 300),
    scale=st.floats(1e-2, 1e4),
    seed=st.integers(0, 2**16),
)
def test_noise_rule_separates_rounding_from_real_change(size: int, scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = (rng.standard_normal(size) * scale).astype(np.float32)
    rms = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
    assume(rms > 1e-2)  # below that, 1e-2 * rms is within atol
    eps = np.finfo(np.float32).eps
    noisy = (ref + rng.uniform(-8, 8, size) * eps * rms).astype(np.float32)
    assert compare_values("y", ref, noisy).ok
    broken = ref.copy()
    broken[rng.integers(size)] += 1e-2 * rms
    assert compare_values("y", ref, broken).verdict == "mismatch"


# ---------------------------------------------------------------- reference reuse, external data, errors


def test_reference_outputs_are_reused_without_rerunning_the_original() -> None:
    original = chain()
    inputs = generate_inputs(original)
    ref = reference_outputs(original, inputs)
    diffs = compare_outputs(ref, run_model(chain(c3=0.3), inputs))
    assert [d.verdict for d in diffs] == ["mismatch"]
    assert verify_models(original, original, inputs=inputs, reference=ref).ok
    tampered = {"y": ref["y"] + 1}
    assert not verify_models(original, original, inputs=inputs, reference=tampered, bisect=False).ok


def test_external_data_models_by_path(tmp_path) -> None:
    for name, c3 in [("orig", 0.25), ("cand", 0.3)]:
        (tmp_path / name).mkdir()
        onnx.save(
            chain(c3),
            tmp_path / name / "m.onnx",
            save_as_external_data=True,
            location="weights.bin",
            size_threshold=0,
        )
    report = verify_models(str(tmp_path / "orig" / "m.onnx"), tmp_path / "cand" / "m.onnx")
    assert not report.ok and report.divergence.node == "n3"


def test_candidate_that_cannot_run_gives_a_failed_report() -> None:
    original = parse("g (float[2] x) => (float[2] y) { y = Relu(x) }")
    candidate = parse("g (float[2] x) => (float[2] y) { y = Relu(x) }")
    candidate.graph.node[0].op_type = "NoSuchOp"
    report = verify_models(original, candidate)
    assert not report.ok and "candidate" in report.error and report.outputs == []
    console = Console(record=True, width=200)
    console.print(render_report(report))
    lines = console.export_text().splitlines()
    assert lines[0] == "verification FAILED" and "NoSuchOp" in lines[1]  # no empty table around it


def test_report_renders_and_serializes() -> None:
    report = verify_models(chain(), chain(c3=0.3))
    data = report.to_dict()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text)["divergence"]["node"] == "n3"
    assert data["outputs"][0]["verdict"] == "mismatch"
    console = Console(record=True, width=140)
    console.print(render_report(report))
    rendered = console.export_text()
    assert "verification FAILED" in rendered and "mismatch" in rendered and "'n3' (Sub)" in rendered
    assert "first divergence" in str(report)


def test_an_empty_mask_is_generated() -> None:
    """A mask whose last dim is 0 (an empty sequence): generating it indexed its first position and crashed."""
    model = parse("g (int64[1, n] attention_mask) => (int64[1, n] y) { y = Identity(attention_mask) }")
    assert generate_inputs(model, {"attention_mask": [1, 0]})["attention_mask"].shape == (1, 0)
