"""The rows of a bench/run.py results file: one per system, variant and model, with its runs summarized,
its decode floor and MBU, and its ratios to PyTorch eager measured in the same run."""
from __future__ import annotations

from typing import Any

import common as C


def recipec_runs(variant: dict[str, Any]) -> dict[str, dict[str, Any]]:
    runs = {}
    for run in variant["serving"]:
        if "concurrency" not in run:
            continue
        s = run["samples"]
        runs[str(run["concurrency"])] = {
            "samples": {"ttft_ms": s["ttft_ms"], "tpot_ms": s["tpot_ms"], "e2e_latency_ms": s["e2e_latency_ms"],
                        "output_throughput_tok_s": [run["output_throughput_tok_s"]]},
            "peak_memory_mb": run["peak_memory_mb"], "host_load_avg": [run.get("host_load_avg_1m")],
            "recipec_mbu": run.get("mbu"), "decode_step_ms": run.get("decode_step_ms")}
    return runs


def batch_runs(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(r["batch"]): {"samples": r["samples"], "peak_memory_mb": r["peak_memory_mb"],
                              "host_load_avg": r["host_load_avg"]} for r in result["runs"]}


def make_row(model: str, system: str, variant: str, precision: str, runs: dict[str, dict[str, Any]] | None,
             weight_bytes: int | None, artifact_bytes: int | None, quality: dict[str, Any] | None,
             status: str = "ok", reason: str | None = None, **extra: Any) -> dict[str, Any]:
    out_runs = {}
    for batch, run in (runs or {}).items():
        stats = {k: C.summarize(v) for k, v in run["samples"].items()}
        out_runs[batch] = {**{k: v for k, v in run.items() if k != "samples"}, **stats}
    return {"model": model, "system": system, "variant": variant, "precision": precision, "status": status,
            "reason": reason, "artifact_bytes": artifact_bytes, "weight_bytes_per_decode_step": weight_bytes,
            "quality": quality, "runs": out_runs, **extra}


def add_limits(rows: list[dict[str, Any]], bandwidth_gb_s: float, kv_bytes_per_token: int, prompt: int,
               output: int, llc: dict[str, Any]) -> None:
    """Per run: the bytes a decode step reads, the TPOT that the measured memory bandwidth allows for them,
    and MBU. Where those bytes fit in the last-level cache, they need not come from memory at all: the run is
    flagged and also gets the floor at the cache's measured copy bandwidth."""
    for row in rows:
        for batch, run in row["runs"].items():
            if row["weight_bytes_per_decode_step"] is None:
                continue
            step = C.decode_step_bytes(row["weight_bytes_per_decode_step"], kv_bytes_per_token, int(batch), prompt,
                                       output)
            run["decode_step_bytes"] = int(step)
            run["tpot_floor_ms"] = step / (bandwidth_gb_s * 1e9) * 1e3
            tpot = (run.get("tpot_ms") or {}).get("p50")
            run["mbu"] = C.mbu(step, tpot, bandwidth_gb_s)
            run["fits_in_llc"] = bool(llc.get("bytes") and step < llc["bytes"])
            if run["fits_in_llc"] and llc.get("bandwidth_gb_s"):
                run["tpot_floor_llc_ms"] = step / (llc["bandwidth_gb_s"] * 1e9) * 1e3


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Every number as a ratio to PyTorch eager on the same model and batch size, measured in this run."""
    base = {r["model"]: r for r in rows if r["system"] == "pytorch-eager" and r["status"] == "ok"}
    for row in rows:
        ref = base.get(row["model"])
        if ref is None:
            continue
        for batch, run in row["runs"].items():
            b = ref["runs"].get(batch)
            if not b:
                continue
            ratio = {}
            for key in ("ttft_ms", "tpot_ms", "e2e_latency_ms", "output_throughput_tok_s"):
                if run.get(key) and b.get(key) and b[key]["p50"]:
                    ratio[key] = run[key]["p50"] / b[key]["p50"]
            if run.get("peak_memory_mb") and b.get("peak_memory_mb"):
                ratio["peak_memory_mb"] = run["peak_memory_mb"] / b["peak_memory_mb"]
            run["ratio_to_pytorch"] = ratio
        if row["artifact_bytes"] and ref["artifact_bytes"]:
            row["artifact_ratio_to_pytorch"] = row["artifact_bytes"] / ref["artifact_bytes"]


def variant_ops(manifest: dict[str, Any], variant: str) -> list[dict[str, Any]]:
    """The stages from the source to the variant, in order."""
    stages = {s["id"]: s for s in manifest["stages"]}
    chain, sid = [], manifest["variants"][variant]["stage"]
    while sid in stages and sid != "source":
        chain.append(stages[sid])
        sid = stages[sid]["after"][0]
    return chain[::-1]


def precision_of(ops: list[dict[str, Any]]) -> str:
    schemes = [s["params"].get("scheme") for s in ops if s["op"] == "quantize"]
    if not schemes:
        return "fp32"
    return {"int8-dynamic": "int8", "int8-static": "int8", "int4": "int4", "fp16": "fp16"}[schemes[-1]]


def phases_of(manifest: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, str | None] | None:
    """A phase-split variant's prefill and decode graphs, as the variants of this build that are those stages
    alone (None where a stage is no variant)."""
    if not ops or ops[-1]["op"] != "phase_split":
        return None
    variant_of = {v["stage"]: name for name, v in manifest["variants"].items()}
    return {"prefill": variant_of.get(ops[-1]["params"]["prefill"]), "decode": variant_of.get(ops[-1]["after"][0])}
