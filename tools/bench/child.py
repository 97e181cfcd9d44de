"""Run one benchmark step in a fresh Python process: isolation, a timeout, and the step's own peak RSS.

The parent writes a request (``module:function`` plus JSON keyword arguments) to a file; the child imports
the modules named in ``preload`` first (so import time and import memory are not charged to the step),
records its RSS baseline, calls the function, and writes the function's JSON result, its wall time and
peak RSS (``VmHWM``, see :func:`_rss_mb`) to a result file. Anything the step prints goes to a captured
pipe, so chatty tools cannot garble the parent's output. A crash (signal, ``sys.exit``, OOM kill) or a
timeout becomes an error string in :class:`ChildResult`; the whole process group of a timed-out child is
killed.

    python -m tools.bench.child request.json result.json
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
ERROR_CHARS = 300  # error text kept per failure: enough to recognise it, short enough for a table


@dataclass
class ChildResult:
    """What one child run produced. ``seconds`` times only the function call (not start-up or imports)."""

    ok: bool
    value: Any = None
    error: str | None = None
    seconds: float | None = None
    wall_seconds: float = 0.0
    peak_rss_mb: float | None = None
    baseline_rss_mb: float | None = None
    timed_out: bool = False
    returncode: int | None = None

    @property
    def rss_above_baseline_mb(self) -> float | None:
        if self.peak_rss_mb is None or self.baseline_rss_mb is None:
            return None
        return self.peak_rss_mb - self.baseline_rss_mb

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rss_above_baseline_mb"] = self.rss_above_baseline_mb
        return data


def short_error(text: str, limit: int = ERROR_CHARS, *, tail: bool = True) -> str:
    """The informative part of an error squeezed onto one line: the last lines of a crashed process's
    output (``tail``), or the first lines of an exception message (whose first line names the problem)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    joined = " | ".join(lines[-3:] if tail else lines[:2]) if lines else "no output"
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


def run_in_child(
    target: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    timeout: float = 600.0,
    preload: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> ChildResult:
    """Call ``target`` (``"package.module:function"``) with ``kwargs`` in a fresh interpreter.

    The function must return something JSON-serializable; paths in ``kwargs`` should be absolute. The
    child runs in ``cwd``, by default a temporary folder removed afterwards, because some tools drop
    scratch files into the working directory. Never raises for failures of the step itself.
    """
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-child-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"target": target, "kwargs": dict(kwargs or {}), "preload": list(preload)}))
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.bench.child", str(request), str(result)],
            cwd=cwd or tmp,
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout kills whatever it started too
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return ChildResult(False, error=f"timeout after {timeout:.0f} s", timed_out=True,
                               wall_seconds=time.perf_counter() - start, returncode=proc.returncode)
        wall = time.perf_counter() - start
        text = output.decode(errors="replace")
        if result.is_file():
            data = json.loads(result.read_text())
            return ChildResult(wall_seconds=wall, returncode=proc.returncode, **data)
        if proc.returncode < 0:
            reason = f"crashed with {signal.Signals(-proc.returncode).name}"
        else:
            reason = f"exited with status {proc.returncode}"
        return ChildResult(False, error=short_error(f"{text}\n{reason}"), wall_seconds=wall,
                           returncode=proc.returncode)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _rss_mb() -> float:
    """Peak RSS of this process image so far, in MB.

    ``VmHWM`` from ``/proc/self/status``, not ``getrusage``: Linux keeps ``ru_maxrss`` across fork and
    execve, so a child started by a benchmark parent that once held a large model would report the
    parent's high-water mark (measured here: every tool "peaked" at the parent's 242 MB after MiniLM).
    ``VmHWM`` belongs to the address space that execve created. ``getrusage`` remains the fallback.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child_main(request_path: str, result_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    out: dict[str, Any] = {"ok": False}
    try:
        for name in request["preload"]:
            importlib.import_module(name)
        module, func = request["target"].split(":")
        function = getattr(importlib.import_module(module), func)
        out["baseline_rss_mb"] = _rss_mb()
        start = time.perf_counter()
        value = function(**request["kwargs"])
        out["seconds"] = time.perf_counter() - start
        out.update(ok=True, value=value)
    except BaseException as exc:  # noqa: BLE001 - everything the step raises is its result
        out["error"] = short_error(f"{type(exc).__name__}: {exc}", tail=False)
        out["value"] = {"traceback": traceback.format_exc(limit=-4)}
    out["peak_rss_mb"] = _rss_mb()
    tmp = result_path + ".tmp"
    Path(tmp).write_text(json.dumps(out, default=str))
    os.replace(tmp, result_path)


if __name__ == "__main__":
    _child_main(*sys.argv[1:3])
