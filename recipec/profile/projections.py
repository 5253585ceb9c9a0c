"""Each variant projected onto other hardware from what was measured here: TPOT, the largest batch whose KV
cache fits, throughput there, TTFT and $ per million output tokens, for tensor-parallel degrees 1-8.

Every number here is *projected* (a roofline model with the efficiencies measured on this machine), never
measured; every row says so and which efficiencies it assumed. docs/metrics.md, Projections states each formula.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from recipec.profile.hardware import KNOWN_GPUS, known_gpu, peak_tflops_for
from recipec.profile.metrics import ModelCost, decode_flops, prefill_flops

# USD per GPU-hour, on demand. Defaults only: `serving.cost.prices` overrides them. H100/H200/A100: the middle
# of the "specialty cloud" band of mercatus-ai.com/blog/cloud-gpu-pricing (May 2026: A100 80GB $1.10-1.50,
# H100 SXM5 $2.50-3.50, H200 SXM5 $3.50-4.50). L4: AWS g6.xlarge (1 L4) at $0.805/h, as quoted in
# citadelcloudmanagement.com's "GPU Infrastructure for AI Workloads ... 2026".
PRICES = {"H100 SXM 80GB": 3.00, "H200 SXM 141GB": 4.00, "A100 SXM 80GB": 1.30, "L4": 0.80}

CPU_ROW = "this CPU"
TENSOR_PARALLEL = (1, 2, 4, 8)
USABLE_MEMORY = 0.9  # the rest is activations, workspace and the allocator's fragmentation
MAX_BATCH = 256  # vLLM's max_num_seqs long defaulted to 256: past what servers schedule would flatter
# Assumed where this machine measured nothing usable. MBU: Databricks' "LLM Inference Performance Engineering"
# reports ~60% at batch 1 (MPT-7B, 2-way TP, TensorRT-LLM). MFU: a round assumption for prefill, not a source.
DEFAULT_MBU = 0.6
DEFAULT_MFU = 0.4
DTYPES = ("float32", "tf32", "float16", "bfloat16", "int8")


@dataclass(frozen=True)
class Link:
    """An all-reduce of n bytes over t devices takes latency_s + 2(t-1)/t * n / bandwidth (ring; nccl-tests'
    bus bandwidth is defined so that this holds)."""
    latency_s: float
    bandwidth_gb_s: float


# NVLink 4 (H100/H200): ~6 us for 128 B-64 KiB all-reduces on 2 GPUs of an HGX H100, rising with the GPU count
# (NVIDIA/nccl#1259), so 8 us; 370 GB/s is the app-level per-direction bandwidth NCCL targets intra-node
# (sjeaugey, NVIDIA/nccl#1442). NVLink 3 (A100): 200 GB/s bus bandwidth (NVIDIA/nccl-tests#178 measured 208).
# PCIe 4 (L4, no NVLink): 40 us small-message all-reduces on 8 PCIe GPUs (42 us, NVIDIA/nccl#1530) and
# ~20 GB/s bus bandwidth (21 GB/s, NVIDIA/nccl-tests#44).
NVLINK4, NVLINK3, PCIE4 = Link(8e-6, 370.0), Link(8e-6, 200.0), Link(40e-6, 20.0)
LINKS = {"H100 SXM 80GB": NVLINK4, "H200 SXM 141GB": NVLINK4, "A100 SXM 80GB": NVLINK3, "L4": PCIE4}


@dataclass(frozen=True)
class Hardware:
    """One row of the table. `memory_gb` is GiB (what torch and psutil report); `link` None: one device only."""
    name: str
    device: str  # "cuda" or "cpu": picks the variant's compute dtype, and fp32 runs as TF32 on CUDA
    bandwidth_gb_s: float
    memory_gb: float
    tflops: Mapping[str, float]
    usd_per_hour: float | None = None
    link: Link | None = None
    max_tensor_parallel: int = 8
    source: str = ""

    def degrees(self) -> list[int]:
        return [t for t in TENSOR_PARALLEL if t == 1 or (self.link and t <= self.max_tensor_parallel)]


@dataclass(frozen=True)
class VariantModel:
    """What a projection needs of a variant beyond its measurements."""
    cost: ModelCost
    compute_dtype: str | Mapping[str, str]  # one dtype, or per device as artifact.json's compute_dtype
    hidden_size: int  # the all-reduced activation is hidden_size wide
    resident_weight_bytes: int | None = None  # all weights as stored (memory); None: the decode-step bytes

    def dtype_on(self, device: str) -> str:
        d = self.compute_dtype
        return d if isinstance(d, str) else d.get(device, "float32")


@dataclass(frozen=True)
class Workload:
    prompt_tokens: float
    output_tokens: float

    @property
    def mean_context(self) -> float:
        """The context a decode step attends over, averaged over the output."""
        return self.prompt_tokens + self.output_tokens / 2.0


@dataclass(frozen=True)
class Efficiency:
    mbu: float
    mfu: float
    mbu_measured: bool = False
    mfu_measured: bool = False
    mbu_source: str = f"default {DEFAULT_MBU}"
    mfu_source: str = f"default {DEFAULT_MFU}"


def gpu_entry(name: str) -> dict[str, Any]:
    """The KNOWN_GPUS datasheet entry whose name is `name`."""
    for _, entry in KNOWN_GPUS:
        if entry["name"] == name:
            return entry
    raise KeyError(f"no GPU named {name!r} in recipec.profile.hardware.KNOWN_GPUS")


def _gpu_row(name: str, link: Link | None) -> Hardware:
    e = gpu_entry(name)
    return Hardware(name, "cuda", float(e["bw"]), float(e["memory_gb"]), dict(e["tflops"]), PRICES.get(name),
                    link, source=e["source"])


def machine_row(report_hardware: Mapping[str, Any] | None) -> Hardware | None:
    """This machine as a row, from its measured peaks: a CPU (TP 1, no default price), or a CUDA GPU that
    is not already among the defaults (TP 1: its interconnect is unknown)."""
    hw = report_hardware or {}
    bw, tflops = hw.get("peak_bandwidth_gb_s"), (hw.get("peak_tflops_by_dtype") or {}).get("tflops") or {}
    if not tflops and hw.get("peak_tflops"):  # reports before per-dtype peaks: fp32 measured on CPU, fp16 on CUDA
        tflops = {("float32" if hw.get("device") == "cpu" else "float16"): hw["peak_tflops"]}
    if not bw or not tflops or not hw.get("memory_gb"):
        return None
    if hw.get("device") == "cpu":
        return Hardware(CPU_ROW, "cpu", float(bw), float(hw["memory_gb"]), dict(tflops),
                        source=f"{hw.get('name', 'CPU')}: measured here ({hw.get('peak_bandwidth_source', '')})")
    spec = known_gpu(str(hw.get("name", "")))  # named as the datasheet names it, so a default GPU is not doubled
    return Hardware(spec["name"] if spec else str(hw.get("name", "this GPU")), "cuda", float(bw),
                    float(hw["memory_gb"]), dict(tflops), source=str(hw.get("peak_bandwidth_source", "")))


def hardware_table(report_hardware: Mapping[str, Any] | None = None,
                   overrides: Mapping[str, Any] | None = None) -> list[Hardware]:
    """The default GPUs, this machine, then the recipe's `serving.cost`: a `hardware` entry replaces the row
    of its name or adds one; `prices` (USD per device-hour) apply last, and one for a row absent here (`this
    CPU` when profiling on a GPU) is ignored."""
    rows = {name: _gpu_row(name, LINKS[name]) for name in PRICES}
    mine = machine_row(report_hardware)
    if mine is not None and mine.name not in rows:
        rows[mine.name] = mine
    for spec in (overrides or {}).get("hardware", []):
        rows[spec["name"]] = _override_row(spec)
    for name, price in (overrides or {}).get("prices", {}).items():
        if name in rows:
            rows[name] = replace(rows[name], usd_per_hour=float(price))
    return list(rows.values())


def _override_row(spec: Mapping[str, Any]) -> Hardware:
    link = spec.get("interconnect")
    return Hardware(spec["name"], spec.get("device", "cuda"), float(spec["bandwidth_gb_s"]), float(spec["memory_gb"]),
                    dict(spec["tflops"]), spec.get("usd_per_hour"),
                    Link(link["latency_us"] / 1e6, float(link["bandwidth_gb_s"])) if link else None,
                    int(spec.get("max_tensor_parallel", 8)), source="recipe serving.cost.hardware")


def override_problems(overrides: Mapping[str, Any] | None) -> list[str]:
    """What the schema cannot check: a price must name a row (a default GPU, `this CPU`, or one the recipe adds)."""
    overrides = overrides or {}
    known = set(PRICES) | {CPU_ROW} | {h["name"] for h in overrides.get("hardware", [])}
    return [f"serving.cost.prices: no hardware row named {name!r} (rows: {', '.join(sorted(known))})"
            for name in overrides.get("prices", {}) if name not in known]


_LINK_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["latency_us", "bandwidth_gb_s"],
                "description": "all-reduce cost: latency per call, and bus bandwidth as nccl-tests reports it",
                "properties": {"latency_us": {"type": "number", "minimum": 0},
                               "bandwidth_gb_s": {"type": "number", "exclusiveMinimum": 0}}}
COST_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "description": "Hardware and prices for the projected cost of each variant (docs/metrics.md, Projections).",
    "properties": {
        "prices": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0},
                   "description": "USD per device-hour by hardware row name (e.g. 'H100 SXM 80GB', 'this CPU')"},
        "hardware": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["name", "bandwidth_gb_s", "memory_gb", "tflops"],
            "properties": {
                "name": {"type": "string", "minLength": 1, "description": "a default row's name replaces that row"},
                "device": {"enum": ["cuda", "cpu"], "default": "cuda"},
                "bandwidth_gb_s": {"type": "number", "exclusiveMinimum": 0},
                "memory_gb": {"type": "number", "exclusiveMinimum": 0, "description": "GiB per device"},
                "tflops": {"type": "object", "minProperties": 1, "propertyNames": {"enum": list(DTYPES)},
                           "additionalProperties": {"type": "number", "exclusiveMinimum": 0},
                           "description": "dense peak TFLOP/s (int8: TOPS) per dtype"},
                "usd_per_hour": {"type": "number", "minimum": 0},
                "interconnect": _LINK_SCHEMA,
                "max_tensor_parallel": {"enum": list(TENSOR_PARALLEL), "default": 8,
                                        "description": "without interconnect the row projects TP 1 only"},
            }}},
    },
}


def measured_efficiency(serving: Sequence[Mapping[str, Any]]) -> Efficiency:
    """MBU and prefill MFU of the first concurrency-1 run, clamped to (0, 1]; a default where it is missing.
    A cache-resident run's MBU is not a DRAM efficiency (its floor is the cache's), so it is not used."""
    run = next((r for r in serving if r.get("concurrency") == 1), None)
    if run is None:
        why = "default (no concurrency-1 run measured here)"
        return Efficiency(DEFAULT_MBU, DEFAULT_MFU, mbu_source=why, mfu_source=why)
    mbu = None if run.get("cache_resident") else run.get("mbu")
    mbu, mbu_ok, mbu_why = _clamped(mbu, DEFAULT_MBU, "mbu")
    if run.get("cache_resident"):
        mbu_why = f"default {DEFAULT_MBU} (the concurrency-1 run was cache-resident)"
    mfu, mfu_ok, mfu_why = _clamped(run.get("mfu_prefill"), DEFAULT_MFU, "mfu_prefill")
    return Efficiency(mbu, mfu, mbu_ok, mfu_ok, mbu_why, mfu_why)


def _clamped(value: float | None, default: float, what: str) -> tuple[float, bool, str]:
    if value is None or value <= 0:
        return default, False, f"default {default} ({what} not measured)"
    if value > 1:
        return 1.0, True, f"{what} measured at concurrency 1: {value:.3g}, clamped to 1"
    return float(value), True, f"{what} measured at concurrency 1"


def peak_tflops(hw: Hardware, dtype: str) -> tuple[float, str]:
    """(peak TFLOP/s, the dtype it is of) for a variant computing in `dtype`; a row without that dtype
    falls back to its float16, then float32 peak (the row says which it used)."""
    _, key = peak_tflops_for({"device": hw.device, "peak_tflops_by_dtype": {"tflops": hw.tflops}}, dtype)
    for fallback in (key, "float16", "float32"):
        if hw.tflops.get(fallback):
            return float(hw.tflops[fallback]), fallback
    raise ValueError(f"hardware row {hw.name!r} has no TFLOP/s for {dtype}, float16 or float32")


def kv_bytes_per_token_per_gpu(cost: ModelCost, t: int) -> float:
    """KV heads split over t devices; with fewer KV heads than devices each device keeps one (replicated)."""
    return 2.0 * cost.num_layers * math.ceil(cost.num_kv_heads / t) * cost.head_dim * cost.kv_bytes_per_elem


def allreduce_s(link: Link | None, t: int, nbytes: float) -> float:
    """One all-reduce of `nbytes` over t devices; nothing to reduce on one."""
    if t == 1 or link is None:
        return 0.0
    return link.latency_s + _allreduce_transfer_s(link, t, nbytes)


def _allreduce_transfer_s(link: Link | None, t: int, nbytes: float) -> float:
    return 0.0 if t == 1 or link is None else 2.0 * (t - 1) / t * nbytes / (link.bandwidth_gb_s * 1e9)


@dataclass(frozen=True)
class StepModel:
    """Seconds of one decode step at batch b on each device:
    max(memory[0] + memory[1]·b, compute·b) + allreduce[0] + allreduce[1]·b."""
    memory: tuple[float, float]
    compute: float
    allreduce: tuple[float, float]

    def seconds(self, b: int) -> float:
        return max(self.memory[0] + self.memory[1] * b, self.compute * b) + self.allreduce[0] + self.allreduce[1] * b

    def bound(self, b: int) -> str:
        return "memory" if self.memory[0] + self.memory[1] * b >= self.compute * b else "compute"


def step_model(m: VariantModel, hw: Hardware, t: int, w: Workload, eff: Efficiency) -> StepModel:
    """Memory: the weights once and each row's KV cache at the mean context, at MBU x bandwidth. Compute: each
    row's decode FLOPs at MFU x peak. Both split over t devices. Two all-reduces per layer (after attention and
    after the MLP, as Megatron-LM splits them) of b x hidden activations."""
    bw = hw.bandwidth_gb_s * 1e9 * eff.mbu
    flops = peak_tflops(hw, m.dtype_on(hw.device))[0] * 1e12 * eff.mfu
    calls, row_bytes = 2 * m.cost.num_layers, m.hidden_size * m.cost.kv_bytes_per_elem
    kv_row = kv_bytes_per_token_per_gpu(m.cost, t) * w.mean_context
    return StepModel(memory=(m.cost.weight_bytes_per_step / t / bw, kv_row / bw),
                     compute=decode_flops(m.cost, w.mean_context) / t / flops,  # type: ignore[arg-type]
                     allreduce=(calls * allreduce_s(hw.link, t, 0.0),
                                calls * _allreduce_transfer_s(hw.link, t, row_bytes)))


def max_batch(m: VariantModel, hw: Hardware, t: int, w: Workload) -> int:
    """Sequences whose whole KV cache (prompt + output) fits beside the weights in the usable memory of each
    device, at most MAX_BATCH; 0 where the weights and one sequence do not fit."""
    weights = (m.resident_weight_bytes or m.cost.weight_bytes_per_step) / t
    per_seq = kv_bytes_per_token_per_gpu(m.cost, t) * (w.prompt_tokens + w.output_tokens)
    free = hw.memory_gb * 2**30 * USABLE_MEMORY - weights
    if free < per_seq:
        return 0
    return MAX_BATCH if per_seq == 0 else min(MAX_BATCH, int(free // per_seq))


def ttft_s(m: VariantModel, hw: Hardware, t: int, w: Workload, eff: Efficiency) -> float:
    """One prompt alone (no queue): its FLOPs or its bytes (weights once, its KV written), whichever takes
    longer, plus two all-reduces per layer of prompt x hidden activations."""
    p = int(round(w.prompt_tokens))
    compute = prefill_flops(m.cost, p) / t / (peak_tflops(hw, m.dtype_on(hw.device))[0] * 1e12 * eff.mfu)
    nbytes = m.cost.weight_bytes_per_step + m.cost.kv_bytes_per_token * p
    memory = nbytes / t / (hw.bandwidth_gb_s * 1e9 * eff.mbu)
    activations = p * m.hidden_size * m.cost.kv_bytes_per_elem
    return max(compute, memory) + 2 * m.cost.num_layers * allreduce_s(hw.link, t, activations)


def _usd_per_mtok(usd_per_hour: float | None, t: int, tok_s: float) -> float | None:
    return None if usd_per_hour is None else usd_per_hour * t / 3600.0 / tok_s * 1e6


def _point(m: VariantModel, hw: Hardware, t: int, w: Workload, steps: StepModel, b: int) -> dict[str, Any]:
    """The row fields that depend on the batch size; `per_gpu` and `achieved` are per device."""
    step = steps.seconds(b)
    peak = peak_tflops(hw, m.dtype_on(hw.device))[0]
    nbytes = m.cost.weight_bytes_per_step / t + b * kv_bytes_per_token_per_gpu(m.cost, t) * w.mean_context
    flops = b * decode_flops(m.cost, w.mean_context) / t  # type: ignore[arg-type]
    return {"batch_size": b, "tpot_ms": step * 1e3, "output_tok_s": b / step,
            "usd_per_mtok": _usd_per_mtok(hw.usd_per_hour, t, b / step), "bound": steps.bound(b),
            "per_gpu": {"bytes_per_decode_step": nbytes, "flops_per_decode_step": flops,
                        "kv_bytes_per_token": kv_bytes_per_token_per_gpu(m.cost, t)},
            "achieved": {"mbu": nbytes / step / (hw.bandwidth_gb_s * 1e9), "mfu": flops / step / (peak * 1e12),
                         "tflops": flops / step / 1e12, "arithmetic_intensity": flops / nbytes}}


def project(variant: str, m: VariantModel, w: Workload, eff: Efficiency,
            hardware: Sequence[Hardware]) -> list[dict[str, Any]]:
    """Rows for each hardware row and tensor-parallel degree: batch 1, and the largest batch that fits; a
    degree that does not divide the query heads is skipped; one row with nulls where nothing fits."""
    rows = []
    for hw in hardware:
        for t in hw.degrees():
            if m.cost.num_heads % t == 0:
                rows.extend(_rows_for(variant, m, hw, t, w, eff))
    return rows


def _rows_for(variant: str, m: VariantModel, hw: Hardware, t: int, w: Workload,
              eff: Efficiency) -> list[dict[str, Any]]:
    steps, most = step_model(m, hw, t, w, eff), max_batch(m, hw, t, w)
    peak, dtype = peak_tflops(hw, m.dtype_on(hw.device))
    common = {"variant": variant, "hardware": hw.name, "tensor_parallel": t, "projected": True, "fits": most > 0,
              "max_batch_size": most, "usd_per_hour": hw.usd_per_hour,
              "workload": {"prompt_tokens": w.prompt_tokens, "output_tokens": w.output_tokens},
              "assumed": {"mbu": eff.mbu, "mfu": eff.mfu, "mbu_measured": eff.mbu_measured,
                          "mfu_measured": eff.mfu_measured, "mbu_source": eff.mbu_source, "mfu_source": eff.mfu_source},
              "peaks": {"bandwidth_gb_s": hw.bandwidth_gb_s, "tflops": peak, "dtype": dtype, "memory_gb": hw.memory_gb},
              "step_s": {"memory": list(steps.memory), "compute": steps.compute, "allreduce": list(steps.allreduce)}}
    if most == 0:
        return [{**common, **dict.fromkeys(("tpot_ms", "ttft_ms", "output_tok_s", "usd_per_mtok")), "batch_size": 0}]
    ttft = ttft_s(m, hw, t, w, eff) * 1e3
    return [{**common, **_point(m, hw, t, w, steps, b), "ttft_ms": ttft} for b in sorted({1, most})]


def workload_of(serving: Sequence[Mapping[str, Any]]) -> Workload | None:
    """The mean prompt and output lengths the variant was served with (a bare {min, max} range: its middle)."""
    if not serving:
        return None
    mean = lambda v: v.get("mean", (v["min"] + v["max"]) / 2.0) if isinstance(v, Mapping) else float(v)  # noqa: E731
    return Workload(mean(serving[0]["prompt_tokens"]), mean(serving[0]["output_tokens"]))


def variant_model(art: Mapping[str, Any]) -> VariantModel:
    """From a variant's artifact.json."""
    from recipec.profile.profiler import model_cost

    cost = model_cost(dict(art))
    hidden = (art.get("model") or {}).get("hidden_size") or cost.num_heads * cost.head_dim
    return VariantModel(cost, art.get("compute_dtype") or "float32", int(hidden), int(art["weights"]["bytes"]))


def _model_from_report(variant: Mapping[str, Any]) -> VariantModel | None:
    from recipec.errors import PassError
    from recipec.onnx.artifact import read_artifact

    path = (variant.get("artifact") or {}).get("path")
    try:
        return variant_model(read_artifact(Path(path))) if path else None
    except (PassError, OSError, KeyError, ValueError):  # moved or not an ONNX variant: nothing to project
        return None


def project_report(report: Mapping[str, Any], models: Mapping[str, VariantModel] | None = None,
                   overrides: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """report.json's `projections`: every variant on every row of hardware_table(report['hardware'],
    overrides). `models` by variant id; a variant not in it is read from its artifact.path (skipped if absent)."""
    hardware = hardware_table(report.get("hardware"), overrides)
    rows = []
    for name, v in report["variants"].items():
        m = (models or {}).get(name) or _model_from_report(v)
        w = workload_of(v.get("serving") or [])
        if m is not None and w is not None:
            rows.extend(project(name, m, w, measured_efficiency(v.get("serving") or []), hardware))
    return rows


def _meets(slo: Mapping[str, float], tpot_ms: float, ttft_ms: float, output_tokens: float) -> bool:
    e2e = ttft_ms + max(output_tokens - 1, 0) * tpot_ms
    return all(value <= slo[key] for key, value in (("tpot_ms", tpot_ms), ("ttft_ms", ttft_ms), ("e2e_latency_ms", e2e))
               if key in slo)


def cost_at_slo(rows: Sequence[Mapping[str, Any]], hardware: str, slo: Mapping[str, float],
                variant: str | None = None) -> dict[str, Any] | None:
    """The cheapest projected point on `hardware` meeting every SLO given (tpot_ms, ttft_ms, e2e_latency_ms):
    per tensor-parallel degree the largest batch in 1..max_batch_size meeting it (throughput grows with the
    batch, so it is the cheapest), then the degree with the lowest $/Mtok (ties: fewer devices). None where
    no point meets it or the row has no price."""
    best: dict[str, Any] | None = None
    seen = set()
    for r in rows:
        key = (r["variant"], r["tensor_parallel"])
        if r["hardware"] != hardware or (variant and r["variant"] != variant) or key in seen:
            continue
        seen.add(key)
        point = _best_batch(r, slo)
        if point and (best is None or (point["usd_per_mtok"], point["tensor_parallel"])
                      < (best["usd_per_mtok"], best["tensor_parallel"])):
            best = point
    return best


def _best_batch(r: Mapping[str, Any], slo: Mapping[str, float]) -> dict[str, Any] | None:
    if not r["fits"] or r.get("usd_per_hour") is None:
        return None
    s = r["step_s"]
    steps = StepModel(tuple(s["memory"]), s["compute"], tuple(s["allreduce"]))  # type: ignore[arg-type]
    t = r["tensor_parallel"]
    for b in range(r["max_batch_size"], 0, -1):
        tpot = steps.seconds(b)
        if _meets(slo, tpot * 1e3, r["ttft_ms"], r["workload"]["output_tokens"]):
            return {"variant": r["variant"], "hardware": r["hardware"], "tensor_parallel": t, "batch_size": b,
                    "tpot_ms": tpot * 1e3, "ttft_ms": r["ttft_ms"], "output_tok_s": b / tpot,
                    "usd_per_mtok": _usd_per_mtok(r["usd_per_hour"], t, b / tpot), "projected": True,
                    "slo": dict(slo)}
    return None
