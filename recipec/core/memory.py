"""Process memory: the peak resident set of a piece of work, freed memory handed back to the OS, and the one
memory guard: work that would need more memory than the machine can give stops before it starts, with the
numbers, instead of being killed by the kernel halfway.

A build's stage is measured without resetting the kernel's peak-RSS mark (/proc/self/clear_refs): that mark is
also what `/usr/bin/time -v` and wait4() report for the whole process when it ends, and a reset would hide the
earlier stages' peaks from them. The mark is read before and after the stage instead: when it rose, the stage
set the process's peak and the mark is exact; otherwise a separate process sampled the resident set every 2 ms
(a thread here would stall whenever a C call holds the GIL, such as a protobuf parse, which is when memory
moves). A process of its own (the profiler's serving worker) may reset the mark: `reset_peak_mark`.
"""
from __future__ import annotations

import ctypes
import gc
import os
import resource
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from recipec.errors import PassError, UsageError

LIMIT_ENV = "RECIPEC_MEMORY_LIMIT_MB"  # the memory a stage may use, in MiB, instead of what the machine has free
# Samples /proc/PID/statm (resident pages) every 2 ms until its stdin closes, then prints the largest; its first
# line says it has started, so that nothing the block does goes unsampled.
_SAMPLER = ("import select, sys\n"
            "path, peak = '/proc/%s/statm' % sys.argv[1], 0\n"
            "print('sampling', flush=True)\n"
            "while not select.select([sys.stdin], [], [], 0.002)[0]:\n"
            "    with open(path) as f:\n"
            "        peak = max(peak, int(f.read().split()[1]))\n"
            "print(peak)\n")


def reset_peak_mark() -> bool:
    """Reset this process's VmHWM to its current resident set (Linux); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return vm_hwm_mb() is not None
    except OSError:
        return False


def vm_hwm_mb() -> float | None:
    return _status_mb("VmHWM:")


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def max_rss_mb() -> float:
    """The kernel's peak-RSS mark of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def release() -> None:
    """Hand freed memory back to the OS, so that the next stage neither pays for nor is charged with it: collect
    reference cycles (a model's modules point back at each other), then glibc's malloc_trim returns the freed
    heap pages that free() keeps for reuse."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): free() is all there is
        return None


@dataclass
class Peak:
    mb: float | None = None
    method: str = ""


@contextmanager
def peak_rss() -> Iterator[Peak]:
    """The peak resident set of this process over the block, in MiB, and how it was measured."""
    peak, before = Peak(), max_rss_mb()
    sampler = _start_sampler()
    try:
        yield peak
    finally:
        sampled, after = _stop_sampler(sampler), max_rss_mb()
        if after > before:
            peak.mb, peak.method = after, "process peak (ru_maxrss), set in this stage"
        elif sampled is not None:
            peak.mb, peak.method = sampled, "resident set sampled every 2 ms by a separate process"
        else:
            peak.mb, peak.method = after, "ru_maxrss: the process's peak since it started, an upper bound"


def _start_sampler() -> subprocess.Popen | None:
    if not os.path.exists(f"/proc/{os.getpid()}/statm"):
        return None
    try:
        sampler = subprocess.Popen([sys.executable, "-I", "-S", "-c", _SAMPLER, str(os.getpid())],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return None
    sampler.stdout.readline()
    return sampler


def _stop_sampler(sampler: subprocess.Popen | None) -> float | None:
    """Closing its stdin ends the sampler (as this process's death would); it prints the peak in pages."""
    if sampler is None:
        return None
    out, _ = sampler.communicate("")
    try:
        return int(out) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except ValueError:
        return None


def available() -> tuple[int, str]:
    """Bytes of memory the next piece of work may take, and where that figure comes from."""
    override = os.environ.get(LIMIT_ENV)
    if override:
        try:
            limit = float(override)
        except ValueError:
            limit = -1.0
        if not limit > 0:
            raise UsageError(f"{LIMIT_ENV}={override!r}: expected a positive number of MiB")
        return int(limit * 2**20), f"{LIMIT_ENV}={override}"
    import psutil

    return int(psutil.virtual_memory().available), "memory available on this machine now"


def require_memory(stage: str, what: str, need: int, basis: str, hint: str) -> None:
    """Stop before `stage` runs when `need` bytes are more than the machine can give."""
    have, source = available()
    if need > have:
        raise PassError(f"stage {stage!r}: {what} needs about {size(need)} of memory ({basis}) but only "
                        f"{size(have)} is available ({source}); {hint}")


def size(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"
