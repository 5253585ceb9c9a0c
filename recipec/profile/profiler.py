"""Profile one variant: serving runs under the recipe's batching policy at each load level, peak
memory (recipec.profile.memory), artifact size, and quality against the source model
(recipec.profile.quality).

Serving runs in a fresh Python process (`python -m recipec.profile.profiler worker IN OUT`) so its peak
memory is the variant's alone, not the builder's torch model and caches.

serving_spec is the recipe's resolved `serving` section:
  {threads, batching: {policy, max_batch_size, max_wait_ms, max_tokens_per_step},
   workload: {prompt_tokens, output_tokens, requests, warmup_requests, concurrency, arrival,
              rate_rps, burstiness, seed}, slo: {ttft_ms, tpot_ms, e2e_latency_ms} (optional)}
`policy` may be a list to profile several policies; concurrency and rate_rps may be lists.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from recipec.core.diskspace import tree_bytes
from recipec.errors import PassError
from recipec.runtime.engine import CacheOps, Engine, Policy, RealClock
from recipec.profile.loadgen import Workload, run_closed_loop, run_open_loop
from recipec.profile.memory import PeakMemory
from recipec.profile.metrics import ModelCost, Peaks, latency_samples, length_stats, summarize_run
from recipec.profile.quality import evaluate_quality
from recipec.profile.sweep import expand_runs
from recipec.profile.workload import measure_batch_prompting, workload_sections
from recipec.runtime.records import RequestRecord, StepRecord
from recipec.runtime.slots import step_model
from recipec.runtime.speculative import SpecConfig

_DEFAULT_BATCHING = {"policy": "continuous", "max_batch_size": 8, "max_wait_ms": 5.0, "max_tokens_per_step": 4096}


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _length(v: Any) -> int | list[int]:
    return [v["min"], v["max"]] if isinstance(v, dict) else int(v)


def _longest(v: Any) -> int:
    return int(v["max"]) if isinstance(v, dict) else int(v)


def serving_plan(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per run: policy settings, load level and workload, in the order they are measured
    (ascending load, so a process's memory peak grows with the run that caused it)."""
    b = {**_DEFAULT_BATCHING, **spec.get("batching", {})}
    w = spec.get("workload", {})
    common = {"max_batch_size": b["max_batch_size"], "max_wait_ms": b["max_wait_ms"],
              "max_tokens_per_step": b["max_tokens_per_step"],
              "prompt_tokens": w.get("prompt_tokens", 128), "output_tokens": w.get("output_tokens", 64),
              "num_requests": w.get("requests", 16), "warmup_requests": w.get("warmup_requests", 2),
              "seed": w.get("seed", 0)}
    if w.get("arrival", "closed") == "closed":
        loads = [{"concurrency": int(c)} for c in sorted(_as_list(w.get("concurrency", [1])))]
    elif w["rate_rps"] == "auto":  # a placeholder the sweep expands as it measures (profile/sweep.py)
        loads = [{"rate_rps": "auto", "sweep_size": int(w.get("sweep_size", 6)),
                  "burstiness": float(w.get("burstiness", 1.0)), "max_concurrency": w.get("max_concurrency")}]
    else:
        loads = [{"rate_rps": float(r), "burstiness": float(w.get("burstiness", 1.0)),
                  "max_concurrency": w.get("max_concurrency")} for r in sorted(_as_list(w["rate_rps"]))]
    speculative = spec.get("speculative") or {}
    if speculative.get("method") == "ngram":  # the engine's own speculation; a draft runs in recipec run only
        common["speculative"] = speculative
    return [{"batching": p, **common, **load} for p in _as_list(b["policy"]) for load in loads]


def _workload(run: dict[str, Any]) -> Workload:
    prompts = run.get("prompts") or {}  # token ids from data (profile/workload.py), else random ids
    return Workload(num_requests=run["num_requests"], prompt_len=_length(run["prompt_tokens"]),
                    output_len=_length(run["output_tokens"]), warmup_requests=run["warmup_requests"],
                    seed=run["seed"], ignore_eos=True, prompts=prompts.get("ids"),
                    output_lens=prompts.get("output_tokens"))


def load_model(variant_dir: Path, device: str, threads: int = 0):
    from recipec.runtime import lm as runtime

    return runtime.load(variant_dir, device, threads=threads or None)


def serve_runs(variant_dir: Path, device: str, runs: Sequence[dict[str, Any]], threads: int = 0,
               log: Callable[[str], None] = lambda s: None, allow_cpu_fallback: bool = True) -> dict[str, Any]:
    """Find where onnxruntime places the variant's nodes, then load it and measure each run; raw timestamps
    out, metrics are computed by the caller. A placement with CPU fallback that is not allowed skips the runs:
    the caller fails the variant, and the runs would have taken the serving time for nothing."""
    from recipec.onnx.artifact import MODEL_FILE, read_artifact
    from recipec.onnx.placement import measure_placement

    log("placement: one profiled prefill and decode step")
    placement = measure_placement(Path(variant_dir) / MODEL_FILE, device, threads or None)
    if placement["fallback_ops"] and not allow_cpu_fallback:
        return {"placement": placement, "load_seconds": None, "runs": []}
    vocab = int(read_artifact(variant_dir)["model"]["vocab_size"])
    t0 = time.perf_counter()
    model = load_model(Path(variant_dir), device, threads)
    load_s = time.perf_counter() - t0
    return {"placement": placement, "load_seconds": load_s, "runs": measure_runs(model, runs, vocab, device, log=log)}


def measure_runs(model, runs: Sequence[dict[str, Any]], vocab_size: int, device: str = "cpu", clock=None,
                 cache_ops=None, log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    def measure(run: dict[str, Any]) -> dict[str, Any]:
        if run.get("batch_prompting"):
            return measure_batch_prompting(model, run, clock or RealClock(), cache_ops or CacheOps(), log)
        log(f"serving {run['batching']} " + (f"concurrency {run['concurrency']}" if "concurrency" in run
                                             else f"{run['rate_rps']:.3g} req/s"))
        with PeakMemory(device) as mem:
            res, speculation = _one_run(model, run, vocab_size, clock or RealClock(), cache_ops or CacheOps())
        return {"run": run, "records": [asdict(r) for r in res.records], "steps": [asdict(s) for s in res.steps],
                "speculation": speculation,
                "peak_memory_mb": mem.peak_mb, "peak_memory_source": mem.source,
                # other processes competing for the cores inflate latencies; say how busy the host was
                "host_load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}

    return expand_runs(runs, measure, log)


def _one_run(model, run: dict[str, Any], vocab: int, clock, cache_ops):
    policy = Policy(run["batching"], run["max_batch_size"], run["max_wait_ms"], run["max_tokens_per_step"])
    # slots for a shared-buffer graph, preallocated for the workload's longest sequence
    model = step_model(model, policy.max_batch_size, _longest(run["prompt_tokens"]) + _longest(run["output_tokens"]))
    speculation = SpecConfig(**run["speculative"]) if run.get("speculative") else None
    engine = Engine(model, policy, clock, cache_ops, eos_token_id=getattr(model, "eos_token_ids", None),
                    speculation=speculation)
    w = _workload(run)
    if "concurrency" in run:
        result = run_closed_loop(engine, w, vocab, run["concurrency"], clock)
    else:
        result = run_open_loop(engine, w, vocab, run["rate_rps"], clock, run["burstiness"], run.get("max_concurrency"))
    return result, _speculation_stats(engine, speculation)


def _speculation_stats(engine: Engine, asked: SpecConfig | None) -> dict[str, Any] | None:
    """What the run's speculation did (warmup requests included); why it did not run, when asked and not."""
    if asked is None:
        return None
    if engine.speculation is None:
        return {"ran": False, "why": "the variant's graph has no shared KV buffer (fuse kv_buffer: shared)"}
    return {"ran": True, **engine.spec_stats.as_dict()}


def _worker_main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    result = serve_runs(Path(job["variant_dir"]), job["device"], job["runs"], job.get("threads", 0), log,
                        job.get("allow_cpu_fallback", True))
    Path(argv[1]).write_text(json.dumps(result))
    return 0


def serve_isolated(variant_dir: Path, device: str, runs: list[dict[str, Any]], threads: int,
                    log: Callable[[str], None], allow_cpu_fallback: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="recipec-profile-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"variant_dir": str(variant_dir), "device": device, "runs": runs, "threads": threads,
                                   "allow_cpu_fallback": allow_cpu_fallback}))
        root = str(Path(__file__).resolve().parents[2])  # importable even when recipec is not installed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, "-m", "recipec.profile.profiler", "worker", str(job), str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        tail: list[str] = []
        for line in proc.stderr:  # the worker's progress lines, passed on as they come
            tail = (tail + [line.rstrip()])[-60:]
            log(line.rstrip())
        if proc.wait() != 0:
            raise RuntimeError(f"profiling {variant_dir} failed (exit {proc.returncode}):\n" + "\n".join(tail))
        return json.loads(out.read_text())


def model_cost(art: dict[str, Any]) -> ModelCost:
    """From artifact.json. Embedding tables only Gathers read are excluded from both the bytes a decode
    step reads (it gathers one row) and the FLOP-bearing parameters (a gather multiplies nothing); a tied
    table is also the LM head's matmul, so it stays. MoE: only the routed share of each expert tensor is
    read and multiplied per token, at that tensor's own bytes (exact at batch 1, a lower bound for larger
    batches; see artifact.weight_stats)."""
    w, kv, m = art["weights"], art["kv_cache"], art["model"]
    active = w["active_parameters"] - w["embedding_parameters"]
    return ModelCost(weight_bytes_per_step=int(w["bytes_per_decode_step"]),
                     active_params=int(active), num_layers=int(kv["num_layers"]),
                     num_heads=int(m["num_attention_heads"]), num_kv_heads=int(kv["num_kv_heads"]),
                     head_dim=int(kv["head_dim"]), kv_bytes_per_elem=np.dtype(kv["dtype"]).itemsize,
                     head_params=int(m["vocab_size"]) * int(m["hidden_size"]) if m.get("hidden_size") else 0,
                     head_last_position_only=(art.get("logits") or {}).get("mode") == "selectable")


def summarize_raw(raw: dict[str, Any], cost: ModelCost | None, peaks: Peaks | None, slo: dict | None) -> dict[str, Any]:
    records = [RequestRecord(**r) for r in raw["records"]]
    steps = [StepRecord(**s) for s in raw["steps"]]
    run = dict(raw["run"])
    prompts = run.pop("prompts", None)
    if prompts:  # the token ids stay out of the report; where they came from stays in
        run["prompts"] = prompts["source"]
    # the lengths the measured requests had, whatever the spec asked
    run["prompt_tokens"] = length_stats([r.n_in for r in records])
    run["output_tokens"] = length_stats([r.n_out for r in records])
    summary = summarize_run(records, steps, cost, peaks, slo)
    for k in ("mbu", "mbu_step", "mfu", "mfu_prefill", "mfu_decode"):
        summary.setdefault(k, None)
    # the values behind the summary's ttft/tpot/e2e statistics (the report's plots draw them)
    samples = {k: v for k, v in latency_samples(records).items() if k != "itl_ms"}
    if raw.get("speculation"):
        summary["speculation"] = raw["speculation"]
    return {**run, **summary, "slo": slo, "peak_memory_mb": raw["peak_memory_mb"],
            "peak_memory_source": raw["peak_memory_source"], "host_load_avg_1m": raw.get("host_load_avg_1m"),
            "samples": samples}


def artifact_section(variant_dir: Path, art: dict[str, Any], cost: ModelCost, device: str = "cpu",
                     hardware: dict[str, Any] | None = None) -> dict[str, Any]:
    size = tree_bytes(variant_dir)
    w = art["weights"]
    return {"path": str(variant_dir), "bytes": int(size), "parameters": int(w["parameters"]),
            "active_parameters": int(w["active_parameters"]), "weight_bytes_per_decode_step": cost.weight_bytes_per_step,
            "bytes_by_dtype": {k: int(v["bytes"]) for k, v in w["by_dtype"].items()},
            "compute_dtype": compute_dtype(art, device, hardware)}


def compute_dtype(art: dict[str, Any], device: str, hardware: dict[str, Any] | None) -> dict[str, Any]:
    """The dtype the variant's matmuls compute in on `device` and the peak FLOP/s its MFU divides by."""
    from recipec.profile.hardware import peak_tflops_for

    dtype = art["compute_dtype"]["cuda" if device == "cuda" else "cpu"]
    tflops, peak_dtype = peak_tflops_for(hardware or {}, dtype)
    return {"dtype": dtype, "peak_dtype": peak_dtype, "peak_tflops": tflops}


def profile_variant(variant_dir: Path | str, serving_spec: dict[str, Any], device: str = "cpu",
                    eval_tokens: np.ndarray | None = None, source_logits: np.ndarray | None = None,
                    source_greedy: dict[str, Any] | None = None, hardware: dict[str, Any] | None = None,
                    log: Callable[[str], None] = lambda s: None, name: str | None = None,
                    before_serving: Callable[[dict[str, Any]], str | None] | None = None) -> dict[str, Any]:
    """The report's `variants.<id>` entry. `hardware` is hardware_info()'s dict (its peaks are the MBU
    and MFU denominators; without it they are null). Quality is measured first; `before_serving(entry)` may
    then return a reason not to serve the variant (a search's broken quality constraint): the entry keeps its
    quality, has no serving runs, and says why under `pruned`."""
    variant_dir = Path(variant_dir)
    entry = measure_quality(variant_dir, serving_spec, device, eval_tokens, source_logits, source_greedy,
                            hardware, log)
    reason = before_serving(entry) if before_serving else None
    if reason:
        log(reason)
        return {**entry, "pruned": reason}
    allowed = bool(serving_spec.get("allow_cpu_fallback", False))
    raw = serve_isolated(variant_dir, device, serving_plan(serving_spec), int(serving_spec.get("threads", 0)), log,
                         allowed)
    return finish_serving(entry, raw, variant_dir, serving_spec, hardware, name or variant_dir.name)


def measure_quality(variant_dir: Path, serving_spec: dict[str, Any], device: str, eval_tokens, source_logits,
                    source_greedy, hardware: dict[str, Any] | None, log: Callable[[str], None]) -> dict[str, Any]:
    """The entry with its artifact and quality sections, before any serving run. The model is freed before
    returning: a serving process measured next should not share the machine with it."""
    from recipec.core.memory import release
    from recipec.onnx.artifact import read_artifact

    art = read_artifact(variant_dir)
    log("evaluating quality")
    model = load_model(variant_dir, device, int(serving_spec.get("threads", 0)))
    quality = evaluate_quality(model, eval_tokens, source_logits, source_greedy)
    speculative = _speculative(model, variant_dir, serving_spec, eval_tokens, log)
    del model
    release()
    entry = {"artifact": artifact_section(variant_dir, art, model_cost(art), device, hardware), "quality": quality,
             "serving": [], "load_seconds": None}
    return {**entry, "speculative": speculative} if speculative else entry


def _speculative(model, variant_dir: Path, serving_spec: dict[str, Any], eval_tokens,
                 log: Callable[[str], None]) -> dict[str, Any] | None:
    """serving.speculative measured on this variant (not on the draft itself), where there are eval windows."""
    from recipec.profile.speculative import measure_speculative
    from recipec.runtime.speculative import SpecConfig

    spec = SpecConfig.from_serving(serving_spec)
    if spec is None or eval_tokens is None or variant_dir.name == spec.draft:
        return None
    log(f"speculative decoding ({spec.method}, K={spec.tokens}) against plain decoding, batch 1")
    return measure_speculative(model, variant_dir, spec, eval_tokens, serving_spec)


def finish_serving(entry: dict[str, Any], raw: dict[str, Any], variant_dir: Path, serving_spec: dict[str, Any],
                   hardware: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """The entry with its serving runs summarized from the raw measurement. A measurement made on another node
    (the Ray executor) brings that node's hardware, whose peaks its MBU and MFU divide by."""
    from recipec.onnx.artifact import read_artifact

    placement = {**raw["placement"], "allowed": bool(serving_spec.get("allow_cpu_fallback", False))}
    check_placement(name, placement)
    art = read_artifact(variant_dir)
    node_hardware = raw.get("hardware") or hardware
    artifact = {**entry["artifact"], "compute_dtype": compute_dtype(art, placement["device"], node_hardware)}
    peaks = _peaks(node_hardware, artifact["compute_dtype"])
    cost = model_cost(art)
    serving = [summarize_raw(r, cost, peaks, serving_spec.get("slo")) for r in raw["runs"]
               if not r["run"].get("batch_prompting")]
    remote = {"node": raw["node"], "hardware": raw["hardware"]} if raw.get("node") else {}
    return {**entry, "artifact": artifact, "serving": serving, "load_seconds": raw["load_seconds"],
            "placement": placement, **remote, **workload_sections(serving, raw["runs"], variant_dir)}


def check_placement(variant: str, placement: dict[str, Any]) -> None:
    """A variant that ran on two devices fails its profile unless the recipe allows it: its MBU and MFU would
    divide CPU time by the GPU's peaks."""
    ops = placement["fallback_ops"]
    if not ops or placement["allowed"]:
        return
    raise PassError(
        f"variant {variant}: on device {placement['device']}, onnxruntime ran {placement['fallback_nodes']} "
        f"node(s) on the CPU for want of a {placement['requested_provider']} kernel ({', '.join(ops)}), so its "
        "MBU/MFU would divide CPU time by the GPU's peaks. Change the variant (e.g. float16 for "
        "GroupQueryAttention, int4 MatMulNBits instead of int8-dynamic), or set serving.allow_cpu_fallback: true "
        "in the recipe to profile it anyway (report.json then lists the ops under placement)")


def _peaks(hardware: dict[str, Any] | None, compute_dtype: dict[str, Any] | None = None) -> Peaks | None:
    """The MBU and MFU denominators: the peak bandwidth, and the peak FLOP/s of the dtype the variant
    computes in on this device."""
    if not hardware or not hardware.get("peak_bandwidth_gb_s"):
        return None
    tflops = compute_dtype["peak_tflops"] if compute_dtype is not None else hardware.get("peak_tflops")
    # no peak for the variant's dtype: MFU stays null (a peak of another dtype would be the wrong one), MBU stands
    return Peaks(hardware["peak_bandwidth_gb_s"], tflops or 0.0, hardware.get("last_level_cache_bytes"))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: python -m recipec.profile.profiler worker JOB.json OUT.json")
