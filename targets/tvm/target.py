"""TVM targets for ``cpu`` (this host's LLVM CPU) and ``cuda`` (an NVIDIA GPU, arch given or detected).

TVM 0.27 rejects option strings ("llvm -mcpu=native") and silently treats ``mcpu="native"`` as a
generic CPU, so the host CPU comes from ``Target.from_device(tvm.cpu(0))``. MetaSchedule needs
``num-cores`` on LLVM targets to size its parallel loops.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from graphopt.errors import GraphoptError

from .runtime import usable_cores

TARGETS = ("cpu", "cuda")
_ARCH = re.compile(r"^sm_\d{2,3}[a-z]?$")


def last_level_cache_bytes() -> int | None:
    """Size of this CPU's largest cache, from Linux sysfs; None where that cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        with contextlib.suppress(OSError, ValueError):
            text = entry.read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1))
    return max(sizes, default=None)


def make_target(kind: str, arch: str | None = None, num_cores: int | None = None):
    """The ``tvm.target.Target`` for ``kind`` ("cpu" or "cuda")."""
    import tvm

    if kind == "cpu":
        if arch is not None:
            raise GraphoptError("--arch applies to --target cuda only")
        host = _plain(tvm.target.Target.from_device(tvm.cpu(0)).export())
        if missing := _features_missing_here(tvm.target.Target(host)):
            host["mattr"] = [f"-{f}" for f in missing]
        return tvm.target.Target({**host, "num-cores": num_cores or usable_cores()})
    if kind == "cuda":
        arch = arch or _device_arch()
        if not _ARCH.match(arch):
            raise GraphoptError(f"bad --arch {arch!r}", hint="write the CUDA compute capability, e.g. sm_90")
        # Generic x86-64 host code: the artifact is built to run on another machine (the GPU box),
        # whose CPU may lack this one's extensions; the host side only launches kernels.
        return tvm.target.Target({"kind": "cuda", "arch": arch, **_cuda_limits()}, host="llvm")
    raise GraphoptError(f"unknown target {kind!r}", hint=f"one of: {', '.join(TARGETS)}")


def _plain(exported: dict) -> dict:
    """A target's exported dict without the empty/derived fields the constructor refills."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in exported.items() if k not in ("tag", "keys")}


def _features_missing_here(host) -> list[str]:
    """ISA extensions LLVM assumes for the host's CPU model that the CPU does not actually offer.

    A virtual machine may report a CPU model (e.g. znver4) while its hypervisor hides some of that
    model's extensions (AVX-512 here): code built for the model dies with SIGILL. Linux lists the
    usable extensions in /proc/cpuinfo.
    """
    import tvm

    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if not flags:
        return []
    have = {flag.replace("_", "") for flag in flags}
    with host:
        features = [str(f) for f in tvm.target.codegen.llvm_get_cpu_features()]
    return sorted(f for f in features if f.startswith(_ISA_PREFIXES)
                  and _CPUINFO_NAME.get(f, f).replace(".", "").replace("_", "") not in have)


# LLVM feature names checked against /proc/cpuinfo, and the few that cpuinfo spells differently.
_ISA_PREFIXES = ("avx", "fma", "f16c", "sse", "ssse3", "bmi", "gfni", "vaes", "vpclmulqdq", "amx", "sha")
_CPUINFO_NAME = {"sse3": "pni", "bmi": "bmi1", "sha": "sha_ni", "sse4.1": "sse4_1", "sse4.2": "sse4_2"}


def _cuda_limits() -> dict[str, int]:
    """Thread/shared-memory limits MetaSchedule's GPU rules need (AutoBind fails without them).

    Read from the GPU when there is one; otherwise the limits every CUDA GPU since sm_30 has (static
    shared memory per block, without the opt-in to more).
    """
    import tvm

    dev = tvm.cuda(0)
    if dev.exist:
        return {"max_threads_per_block": dev.max_threads_per_block, "thread_warp_size": dev.warp_size,
                "max_shared_memory_per_block": dev.max_shared_memory_per_block}
    return {"max_threads_per_block": 1024, "thread_warp_size": 32, "max_shared_memory_per_block": 49152}


def _device_arch() -> str:
    import tvm

    dev = tvm.cuda(0)
    if not dev.exist:
        raise GraphoptError("no CUDA GPU here to read the architecture from",
                            hint="give it with --arch, e.g. --arch sm_90 for an H100 (compiling needs no GPU)")
    return "sm_" + dev.compute_version.replace(".", "")
