"""Peak memory over a serving run: this process's resident set on CPU, device memory in use on CUDA.

On Linux the kernel's peak-RSS counter (VmHWM) is reset before each run by writing 5 to
/proc/self/clear_refs (the serving worker is a process of its own, so no one else reads its mark); where that
is refused, RSS is sampled every 5 ms. The readers are recipec.core.memory's.
"""
from __future__ import annotations

import threading
from typing import Callable

from recipec.core.memory import reset_peak_mark, rss_mb, vm_hwm_mb


class PeakMemory:
    """Peak memory of this process (CPU) or of the GPU (CUDA) over a `with` block."""

    def __init__(self, device: str):
        self.device, self.peak_mb, self.source = device, None, ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        self._hwm = reset_peak_mark()
        self._samples: list[float] = []
        if self.device == "cuda":
            self._read, self._interval, self._how = _gpu_reader()
        else:
            self._read, self._interval, self._how = rss_mb, 0.005, "RSS sampled every 5 ms"
        if self.device == "cuda" or not self._hwm:
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
        if self.device != "cuda" and not self._hwm:
            self._samples.append(self._read())  # a run shorter than one interval still gets a sample
        host = vm_hwm_mb() if self._hwm else max(self._samples)
        host_how = "VmHWM after reset (/proc/self/clear_refs)" if self._hwm else self._how
        if self.device == "cuda":
            self.peak_mb = max(self._samples) if self._samples else None
            self.source = f"{self._how}; host process peak {host:.0f} MiB ({host_how})"
        else:
            self.peak_mb, self.source = host, f"serving process peak resident set, {host_how}"
        return False


def _gpu_reader() -> tuple[Callable[[], float | None], float, str]:
    """Device-wide memory in use: it sees onnxruntime's allocations, which torch's allocator stats do not."""
    from recipec.profile.hardware import nvidia_smi, torch_cuda

    if torch_cuda():
        import torch

        def used() -> float:
            free, total = torch.cuda.mem_get_info()
            return (total - free) / 2**20
        return used, 0.010, "GPU memory in use (cudaMemGetInfo total - free) sampled every 10 ms"

    def smi() -> float | None:
        v = nvidia_smi("memory.used")
        return float(v) if v else None
    return smi, 0.100, "GPU memory in use (nvidia-smi memory.used) sampled every 100 ms"

