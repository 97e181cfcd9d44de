"""MetaSchedule tuning: it really speeds the model up, the database is reused, RPC measurement works.

One module so that the tuner's start-up is paid once per process: a module-scoped fixture tunes a
one Conv3x3+Relu (whose untuned loop nest is slow; tuned in NHWC, so with two layout transposes
as tasks beside it) with a handful of trials.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

pytest.importorskip("tvm")

from graphopt.errors import GraphoptError  # noqa: E402
from graphopt.targets.tvm import RPCConfig, compile_model, load  # noqa: E402
from graphopt.targets.tvm.runtime import ArtifactError  # noqa: E402
from graphopt.targets.tvm.tune import database_digest, kernel_threads  # noqa: E402
from tests.targets.tvm_models import assert_matches, conv_layer, ort_outputs  # noqa: E402

pytestmark = pytest.mark.xdist_group("tvm")
TRIALS = 8


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tune")
    onnx.save(conv_layer(), folder / "layer.onnx")
    untuned = compile_model(folder / "layer.onnx", folder / "untuned")
    # a budget of two batches, but the time limit stops it after the first (one batch is always measured)
    first = compile_model(folder / "layer.onnx", folder / "tuned", tune_trials=2 * TRIALS, db=folder / "db",
                          tune_time_limit_s=1e-3)
    return folder, untuned, first


def test_tuned_artifact_is_faster_and_matches_onnxruntime(tuned):
    folder, untuned, first = tuned
    report = first.tuning
    assert report.tasks >= 1 and len(report.tuned) == report.tasks and not report.reused
    assert 0 < report.trials < 2 * TRIALS and report.failed < report.trials and report.timed_out
    assert first.manifest["tuning"]["digest"] == database_digest(folder / "db")
    fast = load(first.path, threads=1)  # one thread: the other test worker may hold the second core
    assert_matches(ort_outputs(conv_layer(), {"x": X}), fast(X))
    assert _speed_ratio(fast, load(untuned.path, threads=1)) < 0.9  # ~0.3-0.7 measured; margin for a busy machine


X = np.random.default_rng(0).standard_normal((1, 32, 32, 32)).astype(np.float32)


def _speed_ratio(a, b) -> float:
    """Median over interleaved rounds of a's latency / b's (the machine's speed drifts)."""
    return statistics.median(a.median_ms({"x": X}, 5) / b.median_ms({"x": X}, 5) for _ in range(5))


def test_second_run_with_the_same_database_tunes_nothing(tuned):
    folder, _, first = tuned
    again = compile_model(folder / "layer.onnx", folder / "again", tune_trials=TRIALS, db=folder / "db")
    assert again.tuning.tuned == [] and again.tuning.trials == 0
    assert sorted(again.tuning.reused) == sorted(first.tuning.tuned)
    assert again.manifest["tuning"]["digest"] == first.manifest["tuning"]["digest"]
    assert again.tuning.seconds < 60


def test_database_without_tuning_applies_its_schedules_and_profiles_in_bytecode_mode(tuned):
    folder, untuned, first = tuned
    applied = compile_model(folder / "layer.onnx", folder / "applied", db=folder / "db", exec_mode="bytecode")
    assert applied.tuning.tuned == [] and applied.tuning.trials == 0
    assert sorted(applied.tuning.reused) == sorted(first.tuning.tuned)
    assert applied.manifest["exec_mode"] == "bytecode" and first.manifest["exec_mode"] == "compiled"
    runner = load(applied.path, threads=1)
    assert_matches(ort_outputs(conv_layer(), {"x": X}), runner(X))
    assert _speed_ratio(runner, load(untuned.path, threads=1)) < 0.9
    kernels = {k["function"] for k in runner.profile({"x": X}, runs=2)}
    assert any("conv2d" in name for name in kernels), kernels
    with pytest.raises(ArtifactError, match="exec-mode bytecode"):
        load(first.path).profile({"x": X})


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_local_runner_processes_time_kernels_on_the_targets_threads(monkeypatch):
    """MetaSchedule's runner workers inherit the environment when they start; without TVM_NUM_THREADS
    TVM gives them half the hardware threads (one of CI's two cores), not the artifact's count."""
    import tvm
    from tvm.support.popen_pool import PopenPoolExecutor

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    with kernel_threads(2):
        pool = PopenPoolExecutor(max_workers=1)
        assert pool.submit(tvm.runtime.num_threads).result() == 2
        pool.shutdown()
    assert "TVM_NUM_THREADS" not in os.environ


def test_applying_a_missing_database_is_an_error(tmp_path):
    onnx.save(conv_layer(), tmp_path / "layer.onnx")
    with pytest.raises(GraphoptError, match="no tuning database"):
        compile_model(tmp_path / "layer.onnx", tmp_path / "out", db=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists() and not (tmp_path / "nowhere").exists()


def test_a_task_whose_candidates_all_failed_counts_as_tuned(tmp_path):
    """A gather's random test indices fall out of bounds, so every candidate fails to run; a second
    compile must not try (and fail) again."""
    from tvm import relax
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.tvm.build import lower_to_tasks
    from graphopt.targets.tvm.target import make_target
    from graphopt.targets.tvm.tune import open_database, tuned_already

    bb = relax.BlockBuilder()
    table, ids = relax.Var("table", relax.TensorType((100, 8), "float32")), relax.Var(
        "ids", relax.TensorType((1, 16), "int64"))
    with bb.function("main", [table, ids]):
        bb.emit_func_output(bb.emit(relax.op.take(table, ids, axis=0)))
    target = make_target("cpu", None, None)
    [task] = ms.relax_integration.extract_tasks(lower_to_tasks(bb.get(), target), target)
    db = open_database(tmp_path / "db")
    assert tuned_already(db, [task], target) == set()
    workload = db.commit_workload(task.dispatched[0])
    failed = ms.database.TuningRecord(Schedule(task.dispatched[0]).trace, workload, [1e10], target,
                                      ms.arg_info.ArgInfo.from_prim_func(task.dispatched[0]["main"]))
    db.commit_tuning_record(failed)
    assert db.query_tuning_record(task.dispatched[0], target, task.task_name) is None  # the case handled
    assert tuned_already(db, [task], target) == {task.task_name}
    assert tuned_already(db, [task], make_target("cuda", "sm_80", None)) == set()  # records are per target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rpc_cluster(servers: int, key: str):
    """A TVM RPC tracker and ``servers`` servers on loopback (subprocesses, stopped on exit). Each runs in
    its own process group, stopped as a group: a server's session workers outlive a stopped server."""
    from tvm import rpc

    tracker_port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                               "--port", str(tracker_port), "--port-end", str(tracker_port + 1)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        for _ in range(servers):
            port = _free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                 "--port-end", str(port + 1), "--tracker", f"127.0.0.1:{tracker_port}", "--key", key],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(Exception):
                queue = rpc.connect_tracker("127.0.0.1", tracker_port).summary()["queue_info"]
                if queue.get(key, {}).get("free", 0) == servers:
                    break
            assert time.monotonic() < deadline, "RPC servers did not register with the tracker"
            assert all(p.poll() is None for p in procs), "an RPC process died"
            time.sleep(1)
        yield f"127.0.0.1:{tracker_port}"
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):  # a server that died on its own
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_tuning_measures_over_rpc_tracker_with_two_servers(tuned, tmp_path):
    folder = tuned[0]
    with rpc_cluster(2, "graphopt-test") as tracker:
        result = compile_model(folder / "layer.onnx", tmp_path / "rpc", tune_trials=4, db=tmp_path / "db",
                               rpc=RPCConfig.parse(tracker, "graphopt-test", workers=2))
    assert result.tuning.trials > 0 and result.tuning.tuned
    records = (tmp_path / "db" / "database_tuning_record.json").read_text().splitlines()
    assert len(records) == result.tuning.trials
    x = np.random.default_rng(1).standard_normal((1, 32, 32, 32)).astype(np.float32)
    assert_matches(ort_outputs(conv_layer(), {"x": x}), load(result.path)(x))
