"""Serving metrics computed from recorded timestamps, as vLLM `bench serve` defines them.

Everything here is pure arithmetic over what the engine recorded (arrival time, one timestamp per
streamed token, and a log of model steps), so it is tested with hand-computed cases. Definitions
and how they differ from GenAI-Perf and llmperf are in docs/metrics.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from recipec.runtime.records import RequestRecord, StepRecord

STAT_KEYS = ("mean", "p50", "p90", "p99")
LATENCY_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms")


@dataclass
class ModelCost:
    """What one token costs this model: the inputs of MBU and MFU."""
    weight_bytes_per_step: int  # bytes of weights one decode step reads, as stored (packed int4 + scales)
    active_params: int  # parameters one token multiplies through (MoE: only routed experts)
    num_layers: int
    num_heads: int  # query heads: attention FLOPs scale with them
    num_kv_heads: int
    head_dim: int
    kv_bytes_per_elem: int
    head_params: int = 0  # the LM head's (vocab x hidden), part of active_params
    head_last_position_only: bool = False  # the runtime asks for the last prompt position's logits only

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes_per_elem


@dataclass
class Peaks:
    bandwidth_gb_s: float
    tflops: float
    last_level_cache_bytes: int | None = None  # CPU: a step whose bytes fit here is not bound by DRAM bandwidth


def stats(values: Iterable[float]) -> dict[str, float] | None:
    """mean/p50/p90/p99 with numpy's linear interpolation (what vLLM uses); None when empty."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return None
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"mean": float(arr.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def length_stats(values: Iterable[int]) -> dict[str, float] | None:
    """min/p50/max/mean of token counts (prompt or output lengths of a run's requests); None when empty."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return None
    return {"min": int(arr.min()), "p50": float(np.percentile(arr, 50)), "max": int(arr.max()),
            "mean": float(arr.mean())}


def ttft(r: RequestRecord) -> float | None:
    return r.token_times[0] - r.arrival if r.token_times else None


def e2e(r: RequestRecord) -> float | None:
    return r.token_times[-1] - r.arrival if r.token_times else None


def tpot(r: RequestRecord) -> float | None:
    # A one-token output has no inter-token time; counting it as 0 would flatter the mean.
    if r.n_out < 2:
        return None
    return (e2e(r) - ttft(r)) / (r.n_out - 1)


def itls(r: RequestRecord) -> list[float]:
    return [b - a for a, b in zip(r.token_times, r.token_times[1:])]


def _ms(values: Iterable[float | None]) -> list[float]:
    return [v * 1000.0 for v in values if v is not None]


def latency_samples(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Each latency of every request that produced tokens and was not cancelled, in ms."""
    done = [r for r in records if not r.cancelled and r.n_out > 0]
    return {
        "ttft_ms": _ms(ttft(r) for r in done),
        "tpot_ms": _ms(tpot(r) for r in done),
        "itl_ms": _ms(g for r in done for g in itls(r)),  # pooled: long outputs weigh more
        "e2e_latency_ms": _ms(e2e(r) for r in done),
    }


def latency_summary(records: Sequence[RequestRecord]) -> dict[str, dict[str, float] | None]:
    return {name: stats(values) for name, values in latency_samples(records).items()}


def meets_slo(r: RequestRecord, slo: dict[str, float]) -> bool:
    values = {"ttft_ms": ttft(r), "tpot_ms": tpot(r), "e2e_latency_ms": e2e(r)}
    for key, limit in slo.items():
        v = values[key]
        # vLLM counts an undefined TPOT (one-token output) as meeting the TPOT SLO.
        if v is not None and v * 1000.0 > limit:
            return False
    return True


def duration(records: Sequence[RequestRecord]) -> float:
    """First arrival to last token of the measured requests (vLLM's benchmark duration)."""
    done = [r for r in records if r.token_times]
    if not done:
        return 0.0
    return max(r.token_times[-1] for r in done) - min(r.arrival for r in records)


def throughput_summary(records: Sequence[RequestRecord], slo: dict[str, float] | None = None) -> dict[str, Any]:
    done = [r for r in records if not r.cancelled and r.n_out > 0]
    dur = duration(records)
    per_s = (lambda x: x / dur) if dur > 0 else (lambda x: None)
    good = sum(meets_slo(r, slo) for r in done) if slo else None
    return {
        "completed": len(done),
        "duration_s": dur,
        "total_input_tokens": sum(r.n_in for r in done),
        "total_output_tokens": sum(r.n_out for r in done),
        "request_throughput_rps": per_s(len(done)),
        "output_throughput_tok_s": per_s(sum(r.n_out for r in done)),
        "total_throughput_tok_s": per_s(sum(r.n_in + r.n_out for r in done)),
        "goodput_rps": per_s(good) if good is not None else None,
    }


def prefill_flops(cost: ModelCost, n: int) -> float:
    """2·P per token for the matmuls, plus QKᵀ and AV over the causal triangle:
    Σ_{t=1..n} 4·L·H·d·t = 2·L·H·d·n(n+1). The LM head runs for the positions whose logits are computed:
    the last one only where the runtime asks for that (logits_to_keep = 1), else all n."""
    head_positions = 1 if cost.head_last_position_only else n
    return (2.0 * (cost.active_params - cost.head_params) * n + 2.0 * cost.head_params * head_positions
            + 2.0 * cost.num_layers * cost.num_heads * cost.head_dim * n * (n + 1))


def decode_flops(cost: ModelCost, ctx: int) -> float:
    """One new token attending over `ctx` positions (itself included)."""
    return 2.0 * cost.active_params + 4.0 * cost.num_layers * cost.num_heads * cost.head_dim * ctx


def step_flops(cost: ModelCost, step: StepRecord) -> float:
    f = prefill_flops if step.kind == "prefill" else decode_flops
    return sum(f(cost, c) for c in step.ctx)


def decode_step_bytes(cost: ModelCost, step: StepRecord) -> float:
    """Weights once per step, plus the whole padded cache of every row the step carries."""
    return cost.weight_bytes_per_step + step.rows * step.padded_len * cost.kv_bytes_per_token


def efficiency(steps: Sequence[StepRecord], cost: ModelCost, peaks: Peaks,
               tpot_mean_ms: float | None) -> dict[str, float | None]:
    """MBU and MFU of one run. `mbu` divides the mean bytes of a decode step by the mean TPOT (the
    Databricks definition); `mbu_step` divides by the measured decode-step time instead, which
    differs from TPOT when prefills interleave with decodes. MFU uses measured step times: TTFT
    includes queueing, so FLOPs/TTFT under load would measure the queue, not the chip."""
    dec = [s for s in steps if s.kind == "decode"]
    pre = [s for s in steps if s.kind == "prefill"]
    bw, fl = peaks.bandwidth_gb_s * 1e9, (peaks.tflops or 0.0) * 1e12  # no peak: that utilization is null
    mean_bytes = float(np.mean([decode_step_bytes(cost, s) for s in dec])) if dec else None
    dec_t = sum(s.seconds for s in dec)
    pre_t = sum(s.seconds for s in pre)
    dec_f = sum(step_flops(cost, s) for s in dec)
    pre_f = sum(step_flops(cost, s) for s in pre)
    ratio = lambda num, den, peak: (num / den / peak) if den > 0 and peak > 0 else None  # noqa: E731
    return {
        "mbu": ratio(mean_bytes, tpot_mean_ms / 1000.0, bw) if mean_bytes and tpot_mean_ms else None,
        "mbu_step": ratio(sum(decode_step_bytes(cost, s) for s in dec), dec_t, bw),
        "mfu": ratio(pre_f + dec_f, pre_t + dec_t, fl),
        "mfu_prefill": ratio(pre_f, pre_t, fl),
        "mfu_decode": ratio(dec_f, dec_t, fl),
        "decode_step_ms": (dec_t / len(dec) * 1000.0) if dec else None,
        "prefill_step_ms": (pre_t / len(pre) * 1000.0) if pre else None,
        "mean_decode_batch": float(np.mean([len(s.ctx) for s in dec])) if dec else None,
        # MBU is still shown for these, flagged: their floor is the cache's bandwidth, not DRAM's
        "cache_resident": (mean_bytes <= peaks.last_level_cache_bytes
                           if mean_bytes and peaks.last_level_cache_bytes else None),
    }


def engine_overhead_ms(steps: Sequence[StepRecord]) -> float | None:
    """Mean decode-step time spent outside onnxruntime's run (sampling, cache bookkeeping, Python), ms;
    None when the model did not report its session time."""
    if not steps or any(s.session_seconds is None for s in steps):
        return None
    return float(np.mean([s.seconds - s.session_seconds for s in steps])) * 1000.0


def summarize_run(records: Sequence[RequestRecord], steps: Sequence[StepRecord], cost: ModelCost | None,
                  peaks: Peaks | None, slo: dict[str, float] | None = None) -> dict[str, Any]:
    """All metrics of one serving run (one policy at one concurrency or rate)."""
    out: dict[str, Any] = {**latency_summary(records), **throughput_summary(records, slo),
                           "engine_overhead_ms": engine_overhead_ms([s for s in steps if s.kind == "decode"])}
    tpot_mean = out["tpot_ms"]["mean"] if out["tpot_ms"] else None
    if cost is not None and peaks is not None:
        out.update(efficiency(steps, cost, peaks, tpot_mean))
    return out
