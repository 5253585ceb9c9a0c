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

# Dense (no 2:4 sparsity) TFLOP/s per dtype (int8: TOPS) and HBM/GDDR bandwidth, from NVIDIA's datasheets,
# which print tensor-core numbers with sparsity: the dense figure is half. "float32" is the CUDA-core FP32
# rate; "tf32" is what fp32 matmuls reach on tensor cores (onnxruntime's CUDA provider uses TF32 unless
# use_tf32=0). Ordered: the first pattern that matches the device name wins (PCIe/NVL before SXM).
def _gpu(name: str, bw: float, memory_gb: float, fp32: float, tf32: float, fp16: float, int8: float,
         sheet: str) -> dict[str, Any]:
    return {"name": name, "bw": bw, "memory_gb": memory_gb,
            "tflops": {"float32": fp32, "tf32": tf32, "float16": fp16, "bfloat16": fp16, "int8": int8},
            "source": f"NVIDIA {sheet} datasheet: {bw:,} GB/s; dense TFLOP/s FP32 {fp32}, TF32 {tf32}, "
                      f"FP16/BF16 {fp16}, INT8 {int8} TOPS (half the with-sparsity figures)"}


KNOWN_GPUS: list[tuple[str, dict[str, Any]]] = [
    (r"H200.*NVL", _gpu("H200 NVL 141GB", 4800, 141, 60, 418, 835, 1671, "H200 (NVL)")),
    (r"H200", _gpu("H200 SXM 141GB", 4800, 141, 67, 494, 989, 1979, "H200 (SXM)")),
    (r"H100.*PCIe", _gpu("H100 PCIe 80GB", 2000, 80, 51, 378, 756, 1513, "H100 (PCIe)")),
    (r"H100.*NVL", _gpu("H100 NVL 94GB", 3900, 94, 60, 418, 835, 1671, "H100 (NVL)")),
    (r"H100", _gpu("H100 SXM 80GB", 3350, 80, 67, 494, 989, 1979, "H100 (SXM)")),
    (r"A100.*(80GB.*PCIe|PCIE.*80GB)", _gpu("A100 PCIe 80GB", 1935, 80, 19.5, 156, 312, 624, "A100 (80GB PCIe)")),
    (r"A100.*80GB", _gpu("A100 SXM 80GB", 2039, 80, 19.5, 156, 312, 624, "A100 (80GB SXM)")),
    (r"A100", _gpu("A100 40GB", 1555, 40, 19.5, 156, 312, 624, "A100 (40GB)")),
    (r"L40S", _gpu("L40S", 864, 48, 91.6, 183, 362, 733, "L40S")),
    (r"\bL4\b", _gpu("L4", 300, 24, 30.3, 60, 121, 242, "L4")),
    (r"\bA10\b", _gpu("A10", 600, 24, 31.2, 62.5, 125, 250, "A10")),
    (r"T4\b", _gpu("T4", 320, 16, 8.1, 8.1, 65, 130, "T4")),
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
    n, dtype = (_MATMUL_N, torch.float32) if device == "cpu" else (8192, torch.float16)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    rate, reps = _best_rate(lambda: torch.matmul(a, b, out=c), 2.0 * n**3, sync)
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    how = f"measured: best of {reps} {n}x{n} {str(dtype).removeprefix('torch.')} matmuls with torch{threads}"
    return rate / 1e12, how


def measure_onnxruntime_tflops(dtype: str) -> tuple[float | None, str]:
    """TFLOP/s (int8: TOPS) of onnxruntime's own CPU kernel for a square matmul in `dtype`: float16 MatMul,
    or int8 MatMulInteger (uint8 x int8 -> int32, the kernel int8 variants run). torch has no fast CPU path
    for these, and the variants run on onnxruntime's kernels anyway."""
    import numpy as np
    from onnx import TensorProto, helper

    from recipec.errors import PassError
    from recipec.onnx.sessions import session

    n = _MATMUL_N
    op, a_type, b_type, out_type, a_np, b_np = _ORT_MATMULS[dtype]
    value_info = lambda name, elem: helper.make_tensor_value_info(name, getattr(TensorProto, elem), [n, n])  # noqa: E731
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["c"])], "peak",
                              [value_info("a", a_type), value_info("b", b_type)], [value_info("c", out_type)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.integers(0, 100, (n, n)).astype(a_np), "b": rng.integers(-50, 50, (n, n)).astype(b_np)}
    try:
        sess = session(model.SerializeToString(), "cpu")
    except PassError as exc:
        return None, f"not measured: onnxruntime has no CPU {op} for {dtype} ({exc})"
    rate, reps = _best_rate(lambda: sess.run(None, feeds), 2.0 * n**3, lambda: None)
    return rate / 1e12, f"measured: best of {reps} {n}x{n} {dtype} {op}s with onnxruntime's CPU provider"


_MATMUL_N = 2048
_ORT_MATMULS = {
    "float16": ("MatMul", "FLOAT16", "FLOAT16", "FLOAT16", "float16", "float16"),
    "int8": ("MatMulInteger", "UINT8", "INT8", "INT32", "uint8", "int8"),
}


def peaks_by_dtype(device: str, name: str, measured: tuple[float, str] | None) -> dict[str, Any]:
    """{"tflops": {dtype: TFLOP/s}, "source"}: a known GPU's datasheet, or the rates measured here: on a CPU
    float32 with torch (`measured`), float16 and int8 with onnxruntime's kernels; on an unknown GPU torch's
    fp16 matmul only. An MFU divides by the peak of the dtype its variant computes in (`peak_tflops_for`)."""
    spec = known_gpu(name) if device == "cuda" else None
    if spec:
        return {"tflops": dict(spec["tflops"]), "source": spec["source"]}
    if measured is None:
        return {"tflops": {}, "source": "not measured"}
    if device != "cpu":
        return {"tflops": {"float16": measured[0]}, "source": f"float16 {measured[1]}"}
    tflops, sources = {"float32": measured[0]}, [f"float32 {measured[1]}"]
    for dtype in _ORT_MATMULS:
        value, how = measure_onnxruntime_tflops(dtype)
        if value is not None:
            tflops[dtype] = value
        sources.append(f"{dtype} {how}")
    return {"tflops": tflops, "source": "; ".join(sources)}


def peak_tflops_for(hardware: dict[str, Any], compute_dtype: str) -> tuple[float | None, str]:
    """(peak TFLOP/s, the dtype it is the peak of) for a variant computing in `compute_dtype` on the
    hardware_info() `hardware`: fp32 matmuls on a CUDA GPU run on TF32 tensor cores."""
    by_dtype = (hardware.get("peak_tflops_by_dtype") or {}).get("tflops") or {}
    key = "tf32" if hardware.get("device") == "cuda" and compute_dtype == "float32" else compute_dtype
    return by_dtype.get(key), key


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
    measured = (info["measured_tflops"], info["measured_tflops_method"]) if measure else None
    info["peak_tflops_by_dtype"] = peaks_by_dtype(device, info["name"], measured)
    spec = known_gpu(info["name"]) if device == "cuda" else None
    if spec:
        info.update(peak_bandwidth_gb_s=float(spec["bw"]), peak_bandwidth_source=spec["source"],
                    peak_tflops=float(spec["tflops"]["float16"]), peak_tflops_source=spec["source"])
    elif measure:
        info.update(peak_bandwidth_gb_s=info["measured_bandwidth_gb_s"],
                    peak_bandwidth_source=info["measured_bandwidth_method"],
                    peak_tflops=info["measured_tflops"], peak_tflops_source=info["measured_tflops_method"])
    else:
        why = "not measured" + ("" if device == "cpu" or torch_cuda() else ": torch has no CUDA here")
        info.update(peak_bandwidth_gb_s=None, peak_bandwidth_source=why, peak_tflops=None, peak_tflops_source=why)
    return info
