"""MetaSchedule tuning with a persistent database, local or over TVM's RPC tracker.

Only the tasks the database cannot already serve are tuned: a task counts as done when the
database has its workload *and* a measured record for it, so a second compile of the same model
for the same target tunes nothing. Measurement runs locally or through ``RPCRunner`` on the
servers registered with a tracker under a key, which spreads it over machines.

The builder uses :func:`build_candidate` instead of MetaSchedule's default build function: the
default one re-imports ``tvm.s_tir.tensor_intrin`` (~40 s here) in every worker batch, so with the
default timeout every candidate fails and "tuning" silently changes nothing (TVM_FACTS.md). Its
worker processes are also kept across batches (``LocalBuilder`` starts fresh ones per batch, each
paying ``import tvm``: 27 % of a profiled run, ~19 s per batch on the loaded 2-core machine).

Search settings (:class:`SearchConfig`) are sized for small budgets on few cores; see its docstring.
The tuner process itself imports that library once (``TuneContext``): it registers the tensor
intrinsics of every backend (~80 s of CPU here, mostly CUDA, ARM, Hexagon, RISC-V, ROCm).
:func:`import_intrinsics_for` imports only the target's own family first (x86: ~1 s), which
the tuner's later ``import tvm.s_tir.tensor_intrin`` then finds already in place.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from graphopt.errors import GraphoptError

logger = logging.getLogger(__name__)

DB_FILES = ("database_workload.json", "database_tuning_record.json")
MS_LOGGER = "tvm.s_tir.meta_schedule"


@dataclass
class RPCConfig:
    """Where measurement runs: servers registered under ``key`` with the tracker at ``host:port``."""

    host: str
    port: int
    key: str
    workers: int = 1  # candidates measured at once (one per server is the natural choice)

    @classmethod
    def parse(cls, tracker: str, key: str, workers: int = 1) -> RPCConfig:
        host, sep, port = tracker.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise GraphoptError(f"bad --rpc-tracker {tracker!r}", hint="write HOST:PORT, e.g. 127.0.0.1:9190")
        return cls(host, int(port), key, workers)


@dataclass(frozen=True)
class SearchConfig:
    """MetaSchedule search settings; the defaults are what a profile of small budgets on 2 cores asked for.

    With MetaSchedule's defaults (population 512, 4 genetic iterations, a fresh build pool per batch)
    a 24-trial ResNet run spent 51 % in mutation, 13 % sampling the initial population and 27 %
    starting build workers: ~35 s per measured candidate. The evolutionary search runs once per
    batch, so its cost is per batch: a smaller population and fewer iterations cut it, and batches
    of up to ``max_batch`` candidates spread it over more measurements. ``max_trials_per_task`` is
    not capped to an even share, so the gradient task scheduler moves the budget to the tasks whose
    latency (x occurrences) is largest and still falling, after one round-robin batch per task.
    """

    population: int = 256
    genetic_iters: int = 3
    init_min_unmeasured: int = 64  # random samples kept in the initial population (<= population)
    max_batch: int = 32  # candidates measured per search round
    min_batch: int = 8
    number: int = 3  # the runner's evaluator: runs per repeat, repeats, minimum time per repeat
    repeat: int = 1
    min_repeat_ms: int = 40
    # Flush the CPU caches (all arguments but the first) before every timed run, so kernels are ranked
    # with their weights streamed from memory, as in a model whose weights exceed the last-level cache.
    cache_flush: bool = False

    def batch(self, trials: int, tasks: int) -> int:
        """Candidates per round: about three rounds per task, and every task gets its first round."""
        return max(1, min(self.max_batch, max(self.min_batch, trials // (3 * tasks)), trials // tasks))

    def strategy(self):
        from tvm.s_tir import meta_schedule as ms

        return ms.search_strategy.EvolutionarySearch(
            population_size=self.population, genetic_num_iters=self.genetic_iters,
            init_min_unmeasured=min(self.init_min_unmeasured, self.population))


@dataclass
class TuningReport:
    database: str
    tasks: int
    tuned: list[str] = field(default_factory=list)  # tasks tuned in this run
    reused: list[str] = field(default_factory=list)  # tasks the database already had
    trials: int = 0  # candidates measured successfully in this run
    failed: int = 0  # candidates that failed to build or run
    timed_out: bool = False  # stopped by the time limit before the trial budget was spent
    seconds: float = 0.0
    digest: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def build_candidate(mod, target, _params):
    """MetaSchedule's default build without its ~40 s tensor-intrinsic import per worker batch."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def open_database(db_dir: str | Path):
    from tvm.s_tir import meta_schedule as ms

    path = Path(db_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)  # JSONDatabase does not create its folder
    except OSError as exc:
        raise GraphoptError(f"cannot create the tuning database folder {path}: {exc.strerror}") from None
    return ms.database.JSONDatabase(work_dir=str(path))


def database_digest(db_dir: str | Path) -> str:
    """sha256 over the database files: which schedules an artifact was built from."""
    digest = hashlib.sha256()
    for name in DB_FILES:
        file = Path(db_dir) / name
        digest.update(file.read_bytes() if file.is_file() else b"")
    return digest.hexdigest()


def import_intrinsics_for(target) -> None:
    """Register the tensor intrinsics of ``target``'s family only (see the module docstring)."""
    import tvm

    package = "tvm.s_tir.tensor_intrin"
    if package in sys.modules:
        return
    triple = str(target.attrs.get("mtriple", "")) if target.kind.name == "llvm" else ""
    family = {"llvm": "x86" if triple.startswith(("x86", "i686")) else "arm_cpu", "cuda": "cuda"}
    if target.kind.name not in family:
        return  # let the tuner import everything
    stub = types.ModuleType(package, "Tensor intrinsics, imported per backend on demand by graphopt")
    stub.__path__ = [str(Path(tvm.__file__).parent / "s_tir" / "tensor_intrin")]  # submodules still import
    sys.modules[package] = stub
    try:
        importlib.import_module(f"{package}.{family[target.kind.name]}")
    except BaseException:
        del sys.modules[package]
        raise


def tuned_already(db, tasks, target) -> set[str]:
    """Names of the ``tasks`` that ``db`` already has records for on ``target``: measured ones, or
    candidates that all failed to run (gathers whose random test indices fall out of bounds; tuning
    those again would fail again, so they compile with default schedules)."""
    tried = {str(r.workload.as_json()[0]) for r in db.get_all_tuning_records() if str(r.target) == str(target)}
    return {task.task_name for task in tasks if db.has_workload(task.dispatched[0])
            and str(db.commit_workload(task.dispatched[0]).as_json()[0]) in tried}


def tune(
    mod,
    target,
    db_dir: str | Path,
    trials: int,
    *,
    rpc: RPCConfig | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
    seed: int = 0,
    search: SearchConfig = SearchConfig(),
    time_limit_s: float | None = None,
) -> TuningReport:
    """Tune the TIR tasks of ``mod`` (a legalized, fused Relax module) that ``db_dir`` lacks, ``trials`` in all.

    ``trials`` 0 tunes nothing and reports what the database (which must exist) already serves.

    ``on_progress(done, total, task_name)`` is called after every measured batch. With
    ``time_limit_s`` the tuner stops after the first batch that ends past it (what was measured is kept).
    """
    from tvm.s_tir import meta_schedule as ms

    if trials < 0:
        raise GraphoptError(f"--trials must be at least 1, got {trials}")
    if trials == 0 and not all((Path(db_dir) / name).is_file() for name in DB_FILES):
        raise GraphoptError(f"no tuning database in {db_dir}", hint="tune first (--tune), or point --db at one")
    start = time.perf_counter()
    import_intrinsics_for(target)
    db = open_database(db_dir)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    done = tuned_already(db, tasks, target)
    missing = [t for t in tasks if t.task_name not in done]
    report = TuningReport(str(db_dir), len(tasks), [t.task_name for t in missing] if trials else [],
                          [t.task_name for t in tasks if t not in missing])
    if trials == 0:
        logger.info("%d of %d tasks have schedules in %s; the rest keep default ones",
                    len(report.reused), len(tasks), db_dir)
    elif not missing:
        logger.info("all %d tasks are in the tuning database %s: nothing to tune", len(tasks), db_dir)
    else:
        batch = search.batch(trials, len(missing))
        ms_logger = logging.getLogger(MS_LOGGER)
        ms_logger.handlers.clear()  # MetaSchedule's logger setup fails on handlers left by an earlier run
        ms_logger.setLevel(logging.DEBUG)  # everything goes to <db>/logs; the console gets INFO only with -v
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            missing, str(db_dir), strategy=search.strategy(), num_threads=_cores(target), seed=seed)
        for handler in ms_logger.handlers:
            if handler.get_name() == f"{MS_LOGGER}.console":
                handler.setLevel(logging.INFO if logger.isEnabledFor(logging.INFO) else logging.WARNING)
        deadline = None if time_limit_s is None else start + time_limit_s
        counter = _Counter(trials, [t.task_name for t in missing], on_progress, deadline)
        builder = _persistent_builder(_cores(target))
        with kernel_threads(_cores(target)):  # the runner's processes start in it: kernels timed as deployed
            runner = _runner(rpc, search)
            try:
                ms.tune.tune_tasks(
                    tasks=contexts, task_weights=weights, work_dir=str(db_dir), max_trials_global=trials,
                    max_trials_per_task=trials, num_trials_per_iter=batch,
                    builder=builder, runner=runner, database=db, cost_model="xgb",
                    measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), counter.callback()],
                )
            except Exception:  # noqa: BLE001 - _TimeUp comes back through TVM's FFI, possibly re-wrapped
                if not counter.timed_out:
                    raise
            finally:  # their worker processes would outlive the tuning (orphans left by the test suite)
                builder.pool.shutdown()
                runner.pool.shutdown()
        report.trials, report.failed, report.timed_out = counter.ok, counter.failed, counter.timed_out
        if counter.ok == 0:
            raise GraphoptError(f"tuning measured no candidate successfully ({counter.failed} failed)",
                                hint="run with -v to see MetaSchedule's build/run errors")
    report.seconds = time.perf_counter() - start
    report.digest = database_digest(db_dir)
    return report


def apply_database(mod, target, db_dir: str | Path):
    """``mod`` with every task that has a record in ``db_dir`` replaced by its best schedule."""
    import tvm
    from tvm import relax

    with target, tvm.transform.PassContext(opt_level=3):
        return relax.transform.MetaScheduleApplyDatabase(work_dir=str(db_dir))(mod)


def _cores(target) -> int:
    """Threads for candidate search and builds: the CPU target's own count, or every core for a GPU
    target (its candidates are generated and compiled on the host; one thread left 16 idle on an H100 box)."""
    from .target import usable_cores

    cores = target.attrs.get("num-cores") if target.kind.name == "llvm" else None
    return int(cores) if cores else usable_cores()


@contextmanager
def kernel_threads(threads: int) -> Iterator[None]:
    """TVM_NUM_THREADS set to ``threads`` inside the block. Compiled kernels read it at every parallel
    launch (unset: half the hardware threads, i.e. serial on this 2-core machine), and MetaSchedule's
    local runner processes inherit it when they start: without it they timed candidates on one
    thread while the artifact runs on the target's ``num-cores``. (RPC servers keep their own.)"""
    previous = os.environ.get("TVM_NUM_THREADS")
    os.environ["TVM_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TVM_NUM_THREADS"]
        else:
            os.environ["TVM_NUM_THREADS"] = previous


def _persistent_builder(workers: int):
    """A MetaSchedule builder running :func:`build_candidate` in worker processes kept across batches.

    Workers are replaced after ``BUILDS_PER_WORKER`` builds: LocalBuilder's reason for fresh pools is
    memory that TVM leaks in long-lived workers.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder, local_builder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class PersistentBuilder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=workers, timeout=BUILD_TIMEOUT_S,
                                          maximum_process_uses=BUILDS_PER_WORKER)

        def build(self, build_inputs):
            jobs = [(build_candidate, None, b.mod, b.target, local_builder._serialize_params(b.params))
                    for b in build_inputs]
            results = []
            for done in self.pool.map_with_error_catching(lambda job: local_builder._worker_func(*job), jobs):
                if done.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(done.value, None))
                elif done.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out after {BUILD_TIMEOUT_S} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {done.value}"))
            return results

    return PersistentBuilder()


BUILD_TIMEOUT_S = 120
BUILDS_PER_WORKER = 256


def _runner(rpc: RPCConfig | None, search: SearchConfig):
    from tvm.s_tir import meta_schedule as ms

    if search.cache_flush:  # one run per repeat: the flush precedes each repeat, not each run
        evaluator = ms.runner.EvaluatorConfig(number=1, repeat=max(search.number * search.repeat, 5),
                                              min_repeat_ms=0, enable_cpu_cache_flush=True)
    else:
        evaluator = ms.runner.EvaluatorConfig(number=search.number, repeat=search.repeat,
                                              min_repeat_ms=search.min_repeat_ms)
    if rpc is None:
        return ms.runner.LocalRunner(timeout_sec=30, evaluator_config=evaluator)
    config = ms.runner.RPCConfig(tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key,
                                 session_timeout_sec=120)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=rpc.workers)


class _TimeUp(Exception):
    """Raised from the measure callback to end tuning at the time limit."""


class _Counter:
    """Counts measured candidates and forwards progress (a MetaSchedule measure callback)."""

    def __init__(self, total: int, names: list[str], on_progress: Callable[[int, int, str], None] | None,
                 deadline: float | None = None) -> None:
        self.total, self.names, self.on_progress, self.deadline = total, names, on_progress, deadline
        self.ok = self.failed = 0
        self.timed_out = False

    def callback(self):
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

        counter = self

        @derived_object
        class Progress(PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
                for built, ran in zip(builder_results, runner_results, strict=False):
                    if built.error_msg is None and ran.error_msg is None:
                        counter.ok += 1
                    else:
                        counter.failed += 1
                        logger.debug("candidate failed: %s", (built.error_msg or ran.error_msg or "")[-500:])
                if counter.on_progress is not None:
                    counter.on_progress(counter.ok + counter.failed, counter.total, counter.names[task_id])
                # Stop once no other task has a measured batch waiting to be committed. Terminating
                # tasks from here trips the scheduler's own checks (it may already have chosen one),
                # so unwind it; this batch is already in the database (callbacks run in order).
                pending = any(record.builder_results is not None
                              for other, record in enumerate(task_scheduler.tasks_) if other != task_id)
                if counter.deadline is not None and time.perf_counter() > counter.deadline and not pending:
                    counter.timed_out = True
                    raise _TimeUp()

        return Progress()
