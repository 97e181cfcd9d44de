"""graphopt.targets.tvm: import checks, cpu/cuda builds, the artifact directory, load(), the CLI."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper

pytest.importorskip("tvm")

from graphopt.cli import main  # noqa: E402
from graphopt.errors import GraphoptError  # noqa: E402
from graphopt.targets.tvm import ArtifactError, compile_model, load, read_manifest  # noqa: E402
from graphopt.targets.tvm.frontend import UnsupportedModelError  # noqa: E402
from tests.targets.tvm_models import assert_matches, conv_net, ort_outputs  # noqa: E402

pytestmark = pytest.mark.xdist_group("tvm")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """conv_net compiled for the CPU with its batch dim left symbolic."""
    folder = tmp_path_factory.mktemp("tvm")
    onnx.save(conv_net(), folder / "net.onnx")
    result = compile_model(folder / "net.onnx", folder / "net.tvm")
    return folder, result


def test_artifact_runs_at_two_batch_sizes_and_matches_onnxruntime(compiled):
    folder, result = compiled
    runner = load(result.path)
    assert runner.inputs == [{"name": "x", "dtype": "float32", "shape": ["N", 3, 16, 16]}]
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
        got = runner(x)
        assert got["y"].shape == (batch, 10)
        assert_matches(ort_outputs(conv_net(), {"x": x}), got)


def test_manifest_records_signature_versions_and_source_hash(compiled):
    import hashlib

    folder, result = compiled
    manifest = read_manifest(result.path)
    assert manifest == result.manifest
    assert manifest["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["N", 10]}]
    assert manifest["source_model"]["sha256"] == hashlib.sha256((folder / "net.onnx").read_bytes()).hexdigest()
    assert manifest["target"]["kind"] == "cpu" and manifest["target"]["tvm"]["kind"] == "llvm"
    assert manifest["target"]["tvm"]["num-cores"] >= 1 and manifest["tuning"] is None
    assert set(manifest["versions"]) == {"graphopt", "tvm", "tvm_ffi"}
    assert (result.path / manifest["library"]).is_file()


def test_runner_sizes_tvms_thread_pool_to_the_cores_the_artifact_was_compiled_for(compiled, tmp_path):
    """In a fresh process: TVM's own default on x86 is half the hardware threads (one of two cores)."""
    import os
    import subprocess
    import sys

    folder, result = compiled
    code = ("import sys, tvm; from graphopt.targets.tvm import load; "
            "import os; cores = os.sched_getaffinity(0); r = load(sys.argv[1], threads=int(sys.argv[2]) or None); "
            "print(r.threads, tvm.runtime.num_threads(), os.sched_getaffinity(0) == cores)")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    cores = result.manifest["target"]["tvm"]["num-cores"]
    for threads, want in ((0, cores), (1, 1)):
        out = subprocess.run([sys.executable, "-c", code, str(result.path), str(threads)], env=env,
                             capture_output=True, text=True, check=True).stdout.split()
        assert out == [str(want), str(want), "True"]  # a one-thread pool pins the caller; load() undoes that


PARALLEL_KERNEL = """
import sys, threading, time
import numpy as np, tvm
from tvm.script import tirx as T
from graphopt.targets.tvm import load

seen = set()

@tvm.register_global_func("test.record_thread", override=True)
def record(i):
    seen.add(threading.get_ident())
    time.sleep(0.01)  # long enough that the other worker takes the other half
    return 0

@T.prim_func
def kernel(a: T.Buffer((8,), "float32")):
    for i in T.parallel(8):
        a[i] = T.Cast("float32", T.call_packed("test.record_thread", i))

lib = tvm.compile(kernel, target="llvm")
runner = load(sys.argv[1], threads=2)
lib(tvm.runtime.tensor(np.zeros(8, "float32")))
print(runner.threads, len(seen))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_kernels_run_on_every_thread_of_the_pool_load_made(compiled, tmp_path):
    """TVM reads TVM_NUM_THREADS at every parallel launch too: load() once restored it after making the
    pool, and every kernel ran serially on the calling thread although the pool had two threads."""
    import subprocess
    import sys

    script = tmp_path / "parallel_kernel.py"  # TVMScript reads the kernel's source from its file
    script.write_text(PARALLEL_KERNEL)
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    out = subprocess.run([sys.executable, str(script), str(compiled[1].path)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", "2"]


def test_runner_rejects_bad_inputs(compiled):
    runner = load(compiled[1].path)
    good = np.zeros((1, 3, 16, 16), np.float32)
    cases = {
        "missing input": ({}, "missing input"),
        "unknown input": ({"x": good, "z": good}, "unknown input"),
        "dtype": ({"x": good.astype(np.float64)}, "dtype float64"),
        "rank": ({"x": good[0]}, "shape [3, 16, 16]"),
        "static dim": ({"x": np.zeros((1, 3, 8, 16), np.float32)}, "shape [1, 3, 8, 16]"),
    }
    for feeds, message in cases.values():
        with pytest.raises(ArtifactError, match=message.replace("[", r"\[")):
            runner.run(feeds)


def test_unsupported_ops_fail_before_any_work(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("TreeEnsembleClassifier", ["r"], ["l", "p"], domain="ai.onnx.ml", name="trees"),
         helper.make_node("QLinearMatMul", ["x", "s", "z", "x", "s", "z", "s", "z"], ["q"], name="qmm")],
        "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("l", T.INT64, [1]), helper.make_tensor_value_info("q", T.FLOAT, [1, 4])],
        [helper.make_tensor("s", T.FLOAT, [], [0.1]), helper.make_tensor("z", T.INT8, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    onnx.save(model, tmp_path / "m.onnx")
    start = time.perf_counter()
    with pytest.raises(UnsupportedModelError) as info:
        compile_model(tmp_path / "m.onnx", tmp_path / "out")
    assert time.perf_counter() - start < 5
    text = str(info.value)
    assert "ai.onnx.ml::TreeEnsembleClassifier (node 'trees')" in text and "QLinearMatMul (node 'qmm')" in text
    assert "Relu" not in text.split("hint")[0] and not (tmp_path / "out").exists()


def test_shapes_bind_inputs_or_symbols_and_an_artifact_is_replaced_whole(tmp_path):
    onnx.save(conv_net(), tmp_path / "net.onnx")
    out = tmp_path / "out"
    by_input = compile_model(tmp_path / "net.onnx", out, shapes={"x": [2, 3, 16, 16]})
    assert by_input.manifest["inputs"][0]["shape"] == [2, 3, 16, 16]
    assert by_input.manifest["outputs"][0]["shape"] == [2, 10]
    by_symbol = compile_model(tmp_path / "net.onnx", out, shapes={"N": [4]})  # replaces the first artifact
    assert read_manifest(out) == by_symbol.manifest and by_symbol.manifest["outputs"][0]["shape"] == [4, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "out"]  # no staging leftovers
    with pytest.raises(GraphoptError, match="no graph input or symbolic dim"):
        compile_model(tmp_path / "net.onnx", tmp_path / "c", shapes={"nope": [1]})
    with pytest.raises(GraphoptError, match="does not fit"):
        compile_model(tmp_path / "net.onnx", tmp_path / "c", shapes={"x": [1, 4, 16, 16]})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(GraphoptError, match="not a compiled artifact"):
        compile_model(tmp_path / "net.onnx", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_tuning_lowers_dense_convolutions_to_nhwc_and_keeps_grouped_ones_nchw():
    from graphopt.targets.tvm.build import _grouped_convs, lower_to_tasks
    from graphopt.targets.tvm.frontend import prepare, to_relax
    from graphopt.targets.tvm.target import make_target

    dense = prepare(conv_net(batch=1))
    grouped = conv_net(channels=3, batch=1)
    for node in grouped.graph.node:
        if node.op_type == "Conv":
            node.attribute.append(helper.make_attribute("group", 3))
    grouped.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(
        np.ones((3, 1, 3, 3), np.float32), "W"))
    assert not _grouped_convs(dense) and _grouped_convs(prepare(grouped))
    target = make_target("cpu", None, None)
    assert "conv2d_nhwc" in lower_to_tasks(to_relax(dense), target, nhwc=True).script()
    assert "conv2d_nhwc" not in lower_to_tasks(to_relax(dense), target).script()


def test_tuning_flushes_caches_only_for_weights_larger_than_the_last_level_cache():
    from graphopt.targets.tvm.build import weights_exceed
    from graphopt.targets.tvm.target import last_level_cache_bytes
    from graphopt.targets.tvm.tune import SearchConfig, _runner

    net = conv_net()
    size = sum(onnx.numpy_helper.to_array(t).nbytes for t in net.graph.initializer)
    assert weights_exceed(net, size - 1) and not weights_exceed(net, size) and not weights_exceed(net, None)
    llc = last_level_cache_bytes()
    assert llc is None or llc >= 1 << 16
    flushed = _runner(None, SearchConfig(cache_flush=True)).evaluator_config
    assert flushed.enable_cpu_cache_flush and flushed.number == 1 and flushed.repeat > 1
    assert not _runner(None, SearchConfig()).evaluator_config.enable_cpu_cache_flush


def test_cuda_build_compiles_without_a_gpu(tmp_path):
    onnx.save(conv_net(), tmp_path / "net.onnx")
    result = compile_model(tmp_path / "net.onnx", tmp_path / "cuda", target="cuda", arch="sm_90")
    manifest = result.manifest
    assert manifest["target"]["kind"] == "cuda" and manifest["target"]["tvm"]["arch"] == "sm_90"
    assert (result.path / "model.so").stat().st_size > 10_000
    if shutil.which("nvcc"):  # kernels precompiled here: the GPU machine needs neither NVRTC nor CUDA headers
        entry = manifest["cuda_fatbin"]
        assert (result.path / entry["file"]).read_bytes()[:4] == b"\x50\xed\x55\xba"  # fatbin magic
    with pytest.raises(GraphoptError, match="bad --arch"):
        compile_model(tmp_path / "net.onnx", tmp_path / "bad", target="cuda", arch="90")


def test_precompiled_kernels_answer_the_load_time_compile_hook_for_their_source_only(tmp_path):
    import hashlib

    import tvm_ffi

    from graphopt.targets.tvm.runtime import _serve_precompiled_kernels

    (tmp_path / "k.fatbin").write_bytes(b"FATBIN")
    fallback = []
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", lambda code: fallback.append(code) or b"other",
                                 override=True)
    _serve_precompiled_kernels(tmp_path, {"file": "k.fatbin",
                                          "source_sha256": hashlib.sha256(b"__global__ void k() {}").hexdigest()})
    hook = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    assert bytes(hook("__global__ void k() {}")) == b"FATBIN"
    assert bytes(hook("__global__ void other() {}")) == b"other" and fallback == ["__global__ void other() {}"]


def test_cuda_artifact_runs_on_a_gpu(tmp_path):
    import tvm

    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU here")
    onnx.save(conv_net(), tmp_path / "net.onnx")
    result = compile_model(tmp_path / "net.onnx", tmp_path / "cuda", target="cuda")
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert_matches(ort_outputs(conv_net(), {"x": x}), load(result.path)(x))


def test_cli_compile_run_verify(tmp_path, capsys):
    onnx.save(conv_net(), tmp_path / "net.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    art, out = tmp_path / "net.tvm", tmp_path / "out.npz"
    assert main(["compile", str(tmp_path / "net.onnx"), "-o", str(art), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["manifest"]["inputs"][0]["name"] == "x"
    assert main(["run", str(art), "--inputs", str(tmp_path / "in.npz"), "-o", str(out), "--repeat", "3",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outputs"] == ["y"] and report["median_ms"] > 0
    assert_matches(ort_outputs(conv_net(), {"x": x}), dict(np.load(out)))
    assert main(["verify", str(tmp_path / "net.onnx"), str(art), "--inputs", str(tmp_path / "in.npz"),
                 "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["ok"] and verdict["outputs"][0]["verdict"] in ("match", "float_noise")


def test_cli_errors_exit_2_without_output(tmp_path, capsys, compiled):
    onnx.save(conv_net(), tmp_path / "net.onnx")
    art = tmp_path / "net.tvm"
    assert main(["compile", str(tmp_path / "net.onnx"), "-o", str(art), "--trials", "8"]) == 2
    assert "only apply with --tune" in capsys.readouterr().err and not art.exists()
    assert main(["compile", str(tmp_path / "net.onnx"), "-o", str(art), "--tune-minutes", "5"]) == 2
    assert "only apply with --tune" in capsys.readouterr().err and not art.exists()
    assert main(["compile", str(tmp_path / "net.onnx"), "-o", str(art), "--tune"]) == 2  # symbolic batch
    assert "tuned schedules need static shapes" in capsys.readouterr().err and not art.exists()
    assert main(["compile", str(tmp_path / "net.onnx"), "-o", str(art), "--shape", "N=1", "--db",
                 str(tmp_path / "nodb")]) == 2
    assert "no tuning database" in capsys.readouterr().err and not art.exists()
    assert not (tmp_path / "nodb").exists()
    assert main(["run", str(tmp_path), "--json"]) == 2
    assert "not a compiled artifact" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", x=np.zeros((1, 3, 16, 16), np.int64))
    bad = str(tmp_path / "bad.npz")
    assert main(["run", str(compiled[1].path), "--inputs", bad, "-o", str(tmp_path / "y.npz")]) == 2
    assert "dtype int64" in capsys.readouterr().err and not (tmp_path / "y.npz").exists()


def test_an_artifact_whose_outputs_differ_from_onnxruntime_is_not_written(tmp_path, monkeypatch, capsys):
    """compile checks the artifact against onnxruntime before putting it in place: a kernel TVM gets wrong
    (here: the imported graph's Relu swapped for Sigmoid behind compile's back) leaves the old artifact."""
    import graphopt.targets.tvm.build as build

    onnx.save(conv_net(), tmp_path / "net.onnx")
    out = tmp_path / "net.tvm"
    first = compile_model(tmp_path / "net.onnx", out, shapes={"N": [2]})
    assert first.manifest["verification"]["checked"] and first.manifest["verification"]["outputs"] == {"y": "match"}
    before = read_manifest(out)
    prepare = build.prepare

    def wrong(*args, **kwargs):
        proto = prepare(*args, **kwargs)
        for node in proto.graph.node:
            node.op_type = "Sigmoid" if node.op_type == "Relu" else node.op_type
        return proto

    monkeypatch.setattr(build, "prepare", wrong)
    with pytest.raises(GraphoptError, match="outputs differ from onnxruntime's on generated inputs: y: mismatch"):
        compile_model(tmp_path / "net.onnx", out, shapes={"N": [2]})
    assert read_manifest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net.tvm"]
    assert main(["compile", str(tmp_path / "net.onnx"), "-o", str(tmp_path / "cli.tvm"), "--shape", "N=2"]) == 2
    assert "outputs differ" in capsys.readouterr().err and not (tmp_path / "cli.tvm").exists()
    assert main(["compile", str(tmp_path / "net.onnx"), "-o", str(tmp_path / "cli.tvm"), "--shape", "N=2",
                 "--no-verify"]) == 0
    assert "verification" not in read_manifest(tmp_path / "cli.tvm")


def test_scalar_inputs_shape_outputs_and_optional_inputs(tmp_path):
    """A 0-d input stays 0-d on its way to the VM, an ONNX Shape output comes back as an int64 array, and a
    graph input TVM cannot take is one clear error."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["y"]), helper.make_node("Shape", ["y"], ["shape"])], "g",
        [helper.make_tensor_value_info("x", T.FLOAT, [2, 3]), helper.make_tensor_value_info("s", T.FLOAT, [])],
        [helper.make_tensor_value_info("y", T.FLOAT, [2, 3]), helper.make_tensor_value_info("shape", T.INT64, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    got = load(compile_model(model, tmp_path / "scalar.tvm").path).run({"x": np.ones((2, 3), np.float32),
                                                                        "s": np.array(2.5, np.float32)})
    np.testing.assert_array_equal(got["y"], np.full((2, 3), 2.5, np.float32))
    assert got["shape"].dtype == np.int64 and got["shape"].tolist() == [2, 3]
    optional = helper.make_graph(
        [helper.make_node("OptionalHasElement", ["o"], ["h"])], "g",
        [helper.make_value_info("o", helper.make_optional_type_proto(helper.make_tensor_type_proto(T.FLOAT, [2])))],
        [helper.make_tensor_value_info("h", T.BOOL, [])])
    with pytest.raises(UnsupportedModelError, match="'o' is not a tensor \\(its type is optional\\)"):
        compile_model(helper.make_model(optional, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "o")
