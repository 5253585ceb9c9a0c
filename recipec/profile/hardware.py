"""Peak memory bandwidth and FLOP/s, the denominators of MBU and MFU.

On CUDA a known GPU's datasheet numbers are the peaks (the field's convention, so MBU/MFU compare
across papers); every device is also measured on the spot so a reader sees what is attainable here.
On a CPU there is no datasheet we can trust for an unnamed virtual CPU, so the measured numbers are
the peaks, and the source string says so.
"""
from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Callable

# Dense (no 2:4 sparsity) fp16/bf16 tensor-core TFLOP/s and HBM/GDDR bandwidth, from NVIDIA's datasheets.
# Ordered: the first pattern that matches torch.cuda.get_device_name() wins (PCIe/NVL before SXM).
KNOWN_GPUS: list[tuple[str, dict[str, Any]]] = [
    (r"H200.*NVL", {"name": "H200 NVL 141GB", "bw": 4800, "tflops": 835,
                    "source": "NVIDIA H200 Tensor Core GPU datasheet (NVL): 4.8 TB/s, 1,671 TFLOP/s FP16 with "
                              "sparsity = 835 dense"}),
    (r"H200", {"name": "H200 SXM 141GB", "bw": 4800, "tflops": 989,
               "source": "NVIDIA H200 Tensor Core GPU datasheet (SXM): 4.8 TB/s, 989 TFLOP/s dense FP16/BF16"}),
    (r"H100.*PCIe", {"name": "H100 PCIe 80GB", "bw": 2000, "tflops": 756,
                     "source": "NVIDIA H100 datasheet (PCIe): 2 TB/s, 1,513 TFLOP/s FP16 with sparsity = 756 dense"}),
    (r"H100.*NVL", {"name": "H100 NVL 94GB", "bw": 3900, "tflops": 835,
                    "source": "NVIDIA H100 datasheet (NVL): 3.9 TB/s, 1,671 TFLOP/s FP16 with sparsity = 835 dense"}),
    (r"H100", {"name": "H100 SXM 80GB", "bw": 3350, "tflops": 989,
               "source": "NVIDIA H100 datasheet (SXM): 3.35 TB/s, 1,979 TFLOP/s FP16 with sparsity = 989 dense"}),
    (r"A100.*(80GB.*PCIe|PCIE.*80GB)", {"name": "A100 PCIe 80GB", "bw": 1935, "tflops": 312,
                                        "source": "NVIDIA A100 datasheet (80GB PCIe): 1,935 GB/s, 312 TFLOP/s FP16 dense"}),
    (r"A100.*80GB", {"name": "A100 SXM 80GB", "bw": 2039, "tflops": 312,
                     "source": "NVIDIA A100 datasheet (80GB SXM): 2,039 GB/s, 312 TFLOP/s FP16 dense"}),
    (r"A100", {"name": "A100 40GB", "bw": 1555, "tflops": 312,
               "source": "NVIDIA A100 datasheet (40GB): 1,555 GB/s, 312 TFLOP/s FP16 dense"}),
    (r"L40S", {"name": "L40S", "bw": 864, "tflops": 362,
               "source": "NVIDIA L40S datasheet: 864 GB/s, 733 TFLOP/s FP16 with sparsity = 362 dense"}),
    (r"\bL4\b", {"name": "L4", "bw": 300, "tflops": 121,
                 "source": "NVIDIA L4 datasheet: 300 GB/s, 242 TFLOP/s FP16 with sparsity = 121 dense"}),
    (r"\bA10\b", {"name": "A10", "bw": 600, "tflops": 125,
                  "source": "NVIDIA A10 datasheet: 600 GB/s, 250 TFLOP/s FP16 with sparsity = 125 dense"}),
    (r"T4\b", {"name": "T4", "bw": 320, "tflops": 65,
               "source": "NVIDIA T4 datasheet: 320 GB/s, 65 TFLOP/s FP16 mixed precision"}),
]

# A decode step streams its weights once: the peak it can reach is a read-dominated stream over a buffer far
# past the last-level cache. Copy bandwidth (read + write counted) is not that peak: write-allocate traffic
# is uncounted, and a step barely writes. At least 1 GiB, and 8x the last-level cache.
_BW_MIN_BYTES = 1 << 30
_LLC_MULTIPLE = 8
_BUDGET_S = 1.0


def known_gpu(device_name: str) -> dict[str, Any] | None:
    for pattern, entry in KNOWN_GPUS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return entry
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _best_rate(run_once: Callable[[], None], work: float, sync: Callable[[], None]) -> tuple[float, int]:
    """Best work/second over repeats within the time budget; the best, not the mean, because a peak
    is what the hardware can do, and other processes only ever slow a repeat down."""
    run_once()
    sync()  # first call pays for page faults / kernel selection
    best, reps, t_end = 0.0, 0, time.perf_counter() + _BUDGET_S
    while reps < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        run_once()
        sync()
        best = max(best, work / (time.perf_counter() - t0))
        reps += 1
    return best, reps


def _torch_device(device: str):
    import torch
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return torch, sync


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache (the last level) that sysfs reports for cpu0, in bytes."""
    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        best = max(best or 0, size)
    return best


def bandwidth_buffer_bytes(llc: int | None) -> int:
    return max(_BW_MIN_BYTES, _LLC_MULTIPLE * (llc or 0))


def measure_bandwidth(device: str = "cpu", llc: int | None = None) -> tuple[float, str]:
    """GB/s of a read-dominated stream: the sum of a float32 buffer far past the last-level cache, on every
    core torch uses (a reduction reads each byte once and writes one number), counting bytes read."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    nbytes = bandwidth_buffer_bytes(llc if device == "cpu" else None)
    buffer = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    rate, reps = _best_rate(lambda: buffer.sum(), float(nbytes), sync)
    who = f"torch, {torch.get_num_threads()} threads" if device == "cpu" else "torch CUDA"
    cache = f" (>= {_LLC_MULTIPLE}x the {llc / 2**20:.0f} MiB last-level cache)" if llc and device == "cpu" else ""
    return rate / 1e9, (f"measured: best of {reps} read-only sums over a {nbytes / 2**20:,.0f} MiB float32 buffer"
                        f"{cache} with {who}, bytes read / time")


def measure_tflops(device: str = "cpu") -> tuple[float, str]:
    """TFLOP/s of a square matmul: fp32 on CPU, fp16 on CUDA (the tensor-core dtype LLMs run in)."""
    torch, sync = _torch_device(device)
    n, dtype = (2048, torch.float32) if device == "cpu" else (8192, torch.float16)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    rate, reps = _best_rate(lambda: torch.matmul(a, b, out=c), 2.0 * n**3, sync)
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    how = f"measured: best of {reps} {n}x{n} {str(dtype).removeprefix('torch.')} matmuls with torch{threads}"
    return rate / 1e12, how


def torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def nvidia_smi(query: str) -> str | None:
    """One field of GPU 0 from nvidia-smi: onnxruntime-gpu can run where torch has no CUDA build."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else None


def _describe(device: str) -> dict[str, Any]:
    if device == "cuda" and torch_cuda():
        import torch
        props = torch.cuda.get_device_properties(0)
        return {"name": props.name, "memory_gb": props.total_memory / 2**30, "driver": nvidia_smi("driver_version"),
                "cuda": torch.version.cuda, "compute_capability": f"{props.major}.{props.minor}"}
    if device == "cuda":
        mem = nvidia_smi("memory.total")
        return {"name": nvidia_smi("name") or "unknown CUDA device", "driver": nvidia_smi("driver_version"),
                "memory_gb": float(mem) / 1024 if mem else None}
    try:
        import psutil
        mem = psutil.virtual_memory().total / 2**30
    except ImportError:
        mem = None
    return {"name": cpu_name(), "cores": os.cpu_count(), "memory_gb": mem}


def hardware_info(device: str = "cpu", measure: bool = True) -> dict[str, Any]:
    """The report's `hardware` section. `measure=False` skips the ~2 s of measurement (tests, or a
    known GPU where only the datasheet peak is wanted)."""
    info: dict[str, Any] = {"device": device, **_describe(device)}
    if device == "cpu":
        info["last_level_cache_bytes"] = last_level_cache_bytes()
    measure = measure and (device == "cpu" or torch_cuda())  # measuring a GPU needs torch's CUDA build
    if measure:
        info["measured_bandwidth_gb_s"], info["measured_bandwidth_method"] = measure_bandwidth(
            device, info.get("last_level_cache_bytes"))
        info["measured_tflops"], info["measured_tflops_method"] = measure_tflops(device)
    spec = known_gpu(info["name"]) if device == "cuda" else None
    if spec:
        info.update(peak_bandwidth_gb_s=float(spec["bw"]), peak_bandwidth_source=spec["source"],
                    peak_tflops=float(spec["tflops"]), peak_tflops_source=spec["source"])
    elif measure:
        info.update(peak_bandwidth_gb_s=info["measured_bandwidth_gb_s"],
                    peak_bandwidth_source=info["measured_bandwidth_method"],
                    peak_tflops=info["measured_tflops"], peak_tflops_source=info["measured_tflops_method"])
    else:
        why = "not measured" + ("" if device == "cpu" or torch_cuda() else ": torch has no CUDA here")
        info.update(peak_bandwidth_gb_s=None, peak_bandwidth_source=why, peak_tflops=None, peak_tflops_source=why)
    return info
