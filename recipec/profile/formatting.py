"""Values as the report prints them, and a serving run's identity, shared by report.md, `recipec compare`
and the plots."""
from __future__ import annotations

import math
from typing import Any

from recipec.profile.gates import lookup


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def delta(v: float | None, base: float | None) -> str:
    """'−78%' style change against baseline; empty when either side is missing."""
    if v is None or base is None or base == 0:
        return ""
    pct = (v / base - 1.0) * 100.0
    return f"{'−' if pct < 0 else '+'}{abs(pct):.0f}%"


def get(d: Any, path: str) -> Any:
    return lookup(d, path.split("."))


def run_key(run: dict[str, Any]) -> tuple:
    return (run["batching"], run.get("concurrency"), run.get("rate_rps"))


def run_label(run: dict[str, Any]) -> str:
    load = f"concurrency {run['concurrency']}" if run.get("concurrency") else f"{run.get('rate_rps')} req/s"
    return f"{run['batching']} batching, {load}"


SERVING_COLUMNS = [("TTFT p50 ms", "ttft_ms.p50"), ("TTFT p99 ms", "ttft_ms.p99"), ("TPOT p50 ms", "tpot_ms.p50"),
                   ("TPOT p99 ms", "tpot_ms.p99"), ("ITL p99 ms", "itl_ms.p99"), ("E2E p50 ms", "e2e_latency_ms.p50"),
                   ("req/s", "request_throughput_rps"), ("out tok/s", "output_throughput_tok_s"),
                   ("MBU", "mbu"), ("MFU", "mfu"), ("peak MiB", "peak_memory_mb")]
