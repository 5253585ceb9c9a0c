"""out/<name>/report.json (validated against schemas/report.schema.json), with report.md
(recipec.profile.markdown) and its plots (recipec.profile.plots) beside it."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Iterable

from recipec import __version__
from recipec.profile.gates import evaluate_gates
from recipec.profile.markdown import render_markdown
from recipec.profile.plots import render_plots

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "report.schema.json"

METHODS = {
    "ttft_ms": "request arrival (its scheduled send time, so queueing counts) to the first streamed token, "
               "as vLLM bench serve; mean/p50/p90/p99 over requests, numpy linear-interpolated percentiles",
    "tpot_ms": "(e2e latency - TTFT) / (output tokens - 1) per request; one-token outputs excluded",
    "itl_ms": "every gap between consecutive tokens of a request, pooled over all requests",
    "e2e_latency_ms": "arrival to last token",
    "request_throughput_rps": "completed requests / duration (first arrival to last token); warm-up requests excluded",
    "output_throughput_tok_s": "output tokens / duration; total_throughput_tok_s adds prompt tokens",
    "goodput_rps": "requests meeting every SLO in serving.slo / duration (null when no SLO is set)",
    "mbu": "(weight bytes one decode step reads, as stored in the artifact (int4: packed bytes + scales; "
           "embedding tables excluded, a decode step gathers one row) + KV-cache bytes the step reads "
           "(rows x padded cache length x 2 x layers x kv heads x head dim x dtype bytes)), averaged over "
           "decode steps, / mean TPOT / peak bandwidth. mbu_step divides by the measured decode-step time instead",
    "mfu": "(2 x active parameters per token + attention 4 x layers x heads x head_dim x context) FLOPs of "
           "the tokens actually generated or prefilled (padding not counted) / measured model-call time / peak "
           "FLOP/s of the dtype the variant computes in (artifact.compute_dtype); mfu_prefill and mfu_decode split it by step kind. Step time, not TTFT, because TTFT includes "
           "queueing",
    "engine_overhead_ms": "mean over decode steps of (step time - onnxruntime's run time inside it), ms: what the "
                          "engine adds to the graph",
    "peak_memory_mb": "CPU: peak resident set (VmHWM) of a separate serving process, reset before each run; "
                      "CUDA: this process's GPU memory (NVML usedGpuMemory for its pid) sampled, device-wide use "
                      "only where NVML does not list the pid (peak_memory_source says which), plus the process's "
                      "peak RSS in peak_memory_source",
    "stage_peak_rss_mb": "build stages: peak resident set of the build process while the stage ran: the kernel's "
                         "peak mark (ru_maxrss) where the stage raised it, else the resident set sampled every 2 ms "
                         "by a separate process; each stage starts after the previous one's memory is handed back "
                         "(gc, malloc_trim)",
    "kl_divergence": "mean over eval positions of KL(source || variant) of next-token distributions, nats",
    "top1_agreement": "fraction of eval positions where the variant's argmax equals the source's",
    "perplexity": "exp(mean next-token NLL of the eval tokens); source_perplexity is the source model's; "
                  "perplexity_ratio = perplexity / source_perplexity",
    "greedy_agreement": "fraction of greedily generated tokens equal to the source's, position by position "
                        "up to the first mismatch counted as mismatches after it",
    "artifact": "bytes: size of the variant directory's files; parameters: tensor elements of the weights",
    "host_load_avg_1m": "the host's 1-minute load average when the run ended; above the core count, other "
                        "processes competed for the cores and latencies are inflated",
    "workload": "closed loop: `concurrency` clients each send a new request when their last ends; open loop: "
                "Gamma(burstiness) arrival gaps at rate_rps, seeded; random prompt token ids (seeded), or "
                "serving.workload.prompts tokenized with the variant's tokenizer in file order; ignore_eos so outputs "
                "have the asked length; greedy decoding. prompt_tokens/output_tokens: min, p50, max, mean of the run's "
                "requests",
    "rate_sweep": "rate_rps: auto is GuideLLM's sweep: a synchronous run (one client), a throughput run (every "
                  "request in flight), then Poisson rates linspace(synchronous rate, throughput rate, sweep_size - 1)"
                  "[1:], each rate its own run",
    "capacity_at_slo_rps": "the highest offered rate whose run had goodput >= 90% of its request rate (90% of "
                           "requests met every SLO); when the next tested rate above it is more than 10% higher and "
                           "failed, interpolated linearly in that share between the two (method: interpolated, not a "
                           "measured rate); every rate held: the highest, a lower bound (not_reached)",
    "batch_prompting": "the workload's first `requests` prompts as questions, asked alone and `size` to a prompt "
                       "(instructions, exemplars grouped size at a time, numbered questions; numbered answers split "
                       "back), closed loop at the task's concurrency, stopping at end of sequence; per request = "
                       "total / questions; accuracy: exact matches of the parsed answers; parse_failure_rate: batched "
                       "questions without a parsed answer",
}


def validate_report(report: dict[str, Any]) -> None:
    """Raises jsonschema.ValidationError naming the first field that breaks the schema."""
    import jsonschema

    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(report)


def build_report(recipe: dict[str, Any], hardware: dict[str, Any], variants: dict[str, dict[str, Any]],
                 gates: Iterable[dict[str, Any]] = (), stages: list[dict[str, Any]] | None = None,
                 environment: dict[str, str] | None = None, **sections: Any) -> dict[str, Any]:
    """`recipe`: {name, sha256[, path]}; `variants`: id -> profile_variant() result; `gates`: the
    recipe's gate list; `stages`: [{id, op, seconds, cached, peak_rss_mb}] of the build; `sections`: more
    top-level blocks (a searching build's `search`)."""
    report = {
        "schema_version": 1,
        "recipec_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": {k: recipe[k] for k in ("name", "sha256", "path") if k in recipe},
        "hardware": hardware,
        "environment": environment or {},
        "variants": variants,
        "methods": {**METHODS, "peaks": f"bandwidth: {hardware.get('peak_bandwidth_source')}; "
                                        f"FLOP/s: {hardware.get('peak_tflops_source')}"},
    }
    report.update({k: v for k, v in sections.items() if v is not None})
    if stages is not None:
        report["build"] = {"stages": stages, "total_seconds": sum(s["seconds"] for s in stages)}
    report["gates"] = evaluate_gates(list(gates), report)
    report["gates_passed"] = all(g["passed"] for g in report["gates"])
    return report


def write_report(out_dir: Path | str, report: dict[str, Any], plots: bool = True) -> dict[str, Path]:
    """Validate, then write report.json, report.md and plots/*.png; returns the paths written."""
    out_dir = Path(out_dir)
    validate_report(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    if plots:
        report["plots"] = {k: str(p.relative_to(out_dir)) for k, p in render_plots(report, out_dir / "plots").items()}
    written["json"] = out_dir / "report.json"
    written["json"].write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    written["md"] = out_dir / "report.md"
    written["md"].write_text(render_markdown(report))
    return written


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
