"""MetaSchedule tuning: it really speeds the model up, the database is reused, RPC measurement works.

One module so that the tuner's start-up is paid once per process: a module-scoped fixture tunes a
single-task model (one Conv3x3+Relu, whose untuned loop nest is slow) with a handful of trials.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

pytest.importorskip("tvm")

from graphopt.targets.tvm import RPCConfig, compile_model, load  # noqa: E402
from graphopt.targets.tvm.tune import database_digest  # noqa: E402
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
    assert 0 < report.trials <= TRIALS and report.failed < report.trials and report.timed_out
    assert first.manifest["tuning"]["digest"] == database_digest(folder / "db")
    x = np.random.default_rng(0).standard_normal((1, 32, 32, 32)).astype(np.float32)
    slow, fast = load(untuned.path), load(first.path)
    assert_matches(ort_outputs(conv_layer(), {"x": x}), fast(x))
    ratios = []
    for _ in range(5):  # interleaved: the machine's speed drifts
        ratios.append(fast.median_ms({"x": x}, 5) / slow.median_ms({"x": x}, 5))
    assert statistics.median(ratios) < 0.9, ratios  # ~0.3-0.7 measured; margin for a busy machine


def test_second_run_with_the_same_database_tunes_nothing(tuned):
    folder, _, first = tuned
    again = compile_model(folder / "layer.onnx", folder / "again", tune_trials=TRIALS, db=folder / "db")
    assert again.tuning.tuned == [] and again.tuning.trials == 0
    assert sorted(again.tuning.reused) == sorted(first.tuning.tuned)
    assert again.manifest["tuning"]["digest"] == first.manifest["tuning"]["digest"]
    assert again.tuning.seconds < 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rpc_cluster(servers: int, key: str):
    """A TVM RPC tracker and ``servers`` servers on loopback (subprocesses, stopped on exit)."""
    from tvm import rpc

    tracker_port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                               "--port", str(tracker_port), "--port-end", str(tracker_port + 1)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(servers):
            port = _free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                 "--port-end", str(port + 1), "--tracker", f"127.0.0.1:{tracker_port}", "--key", key],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
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
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


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
