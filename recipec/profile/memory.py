"""Peak memory over a serving run: this process's resident set on CPU, this process's GPU memory on CUDA.

On Linux the kernel's peak-RSS counter (VmHWM) is reset before each run by writing 5 to
/proc/self/clear_refs (the serving worker is a process of its own, so no one else reads its mark); where that
is refused, RSS is sampled every 5 ms. The readers are recipec.core.memory's.

On CUDA, NVML (nvidia-ml-py) is sampled every 10 ms for the memory of this process alone: the usedGpuMemory
that nvmlDeviceGetComputeRunningProcesses gives for its pid. Device-wide figures (cudaMemGetInfo's total -
free, nvidia-smi's memory.used) would also count the builder process's CUDA context and torch's cached
blocks, and any other tenant's. Where NVML cannot name this process (a container in its own PID namespace
gets host pids from older drivers; Windows WDDM reports no per-process memory), the device-wide memory in use
is sampled instead and the source says so and why.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Collection, Iterable

from recipec.core.memory import reset_peak_mark, rss_mb, vm_hwm_mb

GPU_INTERVAL_S = 0.010


class PeakMemory:
    """Peak memory of this process, in host RAM (CPU) or on the GPU (CUDA), over a `with` block."""

    def __init__(self, device: str):
        self.device, self.peak_mb, self.source = device, None, ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        self._hwm = reset_peak_mark()
        self._samples: list[float] = []
        self._gpu = _gpu_reader() if self.device == "cuda" else None
        if self._gpu is not None:
            self._read, self._interval = self._gpu.read, GPU_INTERVAL_S
        else:
            self._read, self._interval = rss_mb, 0.005
        if self._gpu is not None or not self._hwm:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self._samples.append(value)
            self._stop.wait(self._interval)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._gpu is None and not self._hwm:
            self._samples.append(self._read())  # a run shorter than one interval still gets a sample
        host = vm_hwm_mb() if self._hwm else max(self._samples)
        host_how = "VmHWM after reset (/proc/self/clear_refs)" if self._hwm else "RSS sampled every 5 ms"
        if self._gpu is not None:
            self._gpu.close()
            self.peak_mb = max(self._samples) if self._samples else None
            self.source = f"{self._gpu.describe()}; host process peak {host:.0f} MiB ({host_how})"
        else:
            self.peak_mb, self.source = host, f"serving process peak resident set, {host_how}"
        return False


def own_pids() -> set[int]:
    """This process's pid in every PID namespace this /proc shows (NStgid), so that a container whose /proc
    shows the host's namespace too still finds the pid NVML reports."""
    pids = {os.getpid()}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("NStgid:"):
                    pids.update(int(p) for p in line.split()[1:])
    except (OSError, ValueError):
        pass
    return pids


def own_gpu_bytes(processes: Iterable[tuple[str, Any]], pids: Collection[int]) -> tuple[int | None, str]:
    """(bytes, how) of this process's GPU memory from NVML's (device label, process entry) pairs, each entry
    with .pid and .usedGpuMemory (None where NVML cannot tell); bytes is None, and how says why, where the
    entries do not give it. A process with contexts on several devices uses the sum."""
    processes = list(processes)
    mine = [(device, p) for device, p in processes if p.pid in pids]
    if not mine:
        seen = sorted({p.pid for _, p in processes})
        ours = ", ".join(str(pid) for pid in sorted(pids))
        return None, (f"this process (pid {ours}) is not among the GPU's compute processes as NVML lists them (pids "
                      f"{seen or 'none'}): in a container with its own PID namespace, drivers that do not "
                      "translate pids report the host's")
    if any(p.usedGpuMemory is None for _, p in mine):
        return None, "NVML lists this process but not its memory (usedGpuMemory not available, as under Windows WDDM)"
    devices = ", ".join(sorted({device for device, _ in mine}))
    return sum(int(p.usedGpuMemory) for _, p in mine), f"pid {mine[0][1].pid} on {devices}"


class NvmlReader:
    """Samples this process's GPU memory through NVML, falling back (and saying so) to the device-wide
    memory in use on the GPU onnxruntime uses where NVML cannot name this process."""

    def __init__(self, nvml):
        self._nvml, self._pids = nvml, own_pids()
        self._handles = _device_handles(nvml)
        self._fallback, self._fallback_label = _ort_device(nvml)
        self._own, self._device_wide, self._why = 0, 0, ""
        self._own_how = ""

    def read(self) -> float | None:
        used, how = own_gpu_bytes(self._processes(), self._pids)
        if used is not None:
            self._own, self._own_how = self._own + 1, how
            return used / 2**20
        self._device_wide, self._why = self._device_wide + 1, how
        try:
            return self._nvml.nvmlDeviceGetMemoryInfo(self._fallback).used / 2**20
        except self._nvml.NVMLError:
            return None

    def _processes(self) -> list[tuple[str, Any]]:
        found = []
        for label, handle in self._handles:
            try:
                found += [(label, p) for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)]
            except self._nvml.NVMLError:
                continue  # a MIG parent lists nothing without privileges; its MIG devices are asked instead
        return found

    def describe(self) -> str:
        return describe_gpu_samples(self._own, self._own_how, self._device_wide, self._why, self._fallback_label)

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass


def describe_gpu_samples(own: int, own_how: str, device_wide: int, why: str, device: str) -> str:
    """The peak's source: which samples were this process's own and which device-wide, and why."""
    every = f"sampled every {GPU_INTERVAL_S * 1000:.0f} ms"
    mine = f"this process's GPU memory (NVML usedGpuMemory, {own_how}) {every}"
    wide = (f"device-wide GPU memory in use on {device} (NVML memory info), which counts every process on it, "
            f"because {why}")
    if own and not device_wide:
        return mine
    if device_wide and not own:
        return f"{wide}, {every}"
    if own and device_wide:
        return f"{mine}; {device_wide} of {own + device_wide} samples were {wide}"
    return "GPU memory not measured: no NVML sample was taken"


def _device_handles(nvml) -> list[tuple[str, Any]]:
    """Every GPU, and every MIG device of a GPU in MIG mode: the pid is looked for on all of them, which
    spares mapping CUDA's device order (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER) onto NVML's."""
    handles = []
    for index in range(nvml.nvmlDeviceGetCount()):
        gpu = nvml.nvmlDeviceGetHandleByIndex(index)
        handles.append((f"GPU {index}", gpu))
        handles += [(f"GPU {index} MIG {m}", h) for m, h in _mig_devices(nvml, gpu)]
    return handles


def _mig_devices(nvml, gpu) -> list[tuple[int, Any]]:
    try:
        if nvml.nvmlDeviceGetMigMode(gpu)[0] != nvml.NVML_DEVICE_MIG_ENABLE:
            return []
        count = nvml.nvmlDeviceGetMaxMigDeviceCount(gpu)
    except nvml.NVMLError:  # not MIG-capable
        return []
    found = []
    for m in range(count):
        try:
            found.append((m, nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, m)))
        except nvml.NVMLError:  # an empty slot
            continue
    return found


def _ort_device(nvml) -> tuple[Any, str]:
    """The GPU onnxruntime runs on (its CUDA provider's default device 0, i.e. the first of
    CUDA_VISIBLE_DEVICES), for the device-wide fallback. An index is taken in NVML's order, which is CUDA's
    unless CUDA_DEVICE_ORDER is FASTEST_FIRST on a machine with mixed GPUs."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if first.startswith(("GPU-", "MIG-")):
        return nvml.nvmlDeviceGetHandleByUUID(first), first
    index = int(first) if first.isdigit() else 0
    return nvml.nvmlDeviceGetHandleByIndex(index), f"GPU {index}"


class _Unmeasured:
    """The reader where NVML is missing: every sample is None and the source says why."""

    def __init__(self, why: str):
        self._why = why

    def read(self) -> None:
        return None

    def describe(self) -> str:
        return f"GPU memory not measured: {self._why}"

    def close(self) -> None:
        pass


def _gpu_reader() -> NvmlReader | _Unmeasured:
    try:
        import pynvml
    except ImportError:
        return _Unmeasured("nvidia-ml-py (pynvml, the NVML bindings) is not installed; it comes with recipec's gpu extra")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return _Unmeasured(f"NVML cannot start here ({exc})")
    try:
        return NvmlReader(pynvml)
    except pynvml.NVMLError as exc:
        pynvml.nvmlShutdown()
        return _Unmeasured(f"NVML cannot list the GPUs ({exc})")

