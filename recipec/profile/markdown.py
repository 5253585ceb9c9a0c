"""report.md: what a reviewer reads in a PR. One table per serving run with every variant side by side and
its change against baseline, then quality, gates, build stages, plots and the methods behind the numbers.
"""
from __future__ import annotations

from typing import Any, Iterable

from recipec.profile.formatting import SERVING_COLUMNS, delta, fmt, fmt_bytes, get, run_key, run_label
from recipec.profile.markdown_search import projections_md, search_md, table
from recipec.profile.markdown_workloads import batch_prompting_md, capacity_md


PERCENT = {"mbu", "mfu", "mbu_step", "mfu_prefill", "mfu_decode"}
CACHE_MARK = "†"


def _cell(v: Any, base: Any, with_delta: bool, path: str = "") -> str:
    if path in PERCENT:  # a utilization: its relative change would read as a speedup, so show the level only
        return "–" if v is None else f"{v * 100:.{1 if v >= 0.01 else 2}f}%"
    d = delta(v, base) if with_delta else ""
    return fmt(v) + (f" ({d})" if d else "")


def _runs_by_key(report: dict[str, Any]) -> dict[tuple, dict[str, dict[str, Any]]]:
    """(batching, concurrency, rate) -> variant -> run, in the order runs were measured."""
    out: dict[tuple, dict[str, dict[str, Any]]] = {}
    for name, v in report["variants"].items():
        for run in v.get("serving") or []:
            out.setdefault(run_key(run), {})[name] = run
    return out


def _serving_md(report: dict[str, Any]) -> list[str]:
    parts = []
    for runs in _runs_by_key(report).values():
        base = runs.get("baseline")
        rows = [[f"**{name}**"] + [_cell(get(run, p), get(base, p), name != "baseline", p)
                                   + (CACHE_MARK if p == "mbu" and run.get("cache_resident") else "")
                                   for _, p in SERVING_COLUMNS]
                for name, run in runs.items()]
        first = next(iter(runs.values()))
        parts += [f"### {run_label(first)}", "",
                  f"{first['num_requests']} requests, prompt {_len(first.get('prompt_tokens'))} tokens, "
                  f"output {_len(first.get('output_tokens'))} tokens, max batch {first['max_batch_size']}"
                  + _load_note(runs.values()), "",
                  table(["variant"] + [c for c, _ in SERVING_COLUMNS], rows), ""]
        if any(run.get("cache_resident") for run in runs.values()):
            llc = (report.get("hardware") or {}).get("last_level_cache_bytes")
            parts += [f"{CACHE_MARK} cache-resident: the decode step reads no more bytes than the "
                      f"{'' if llc is None else f'{llc / 2**20:.0f} MiB '}last-level cache, so its floor is the "
                      "cache's bandwidth, not DRAM's; MBU is shown but is not a DRAM utilization.", ""]
    return parts


def _load_note(runs: Iterable[dict[str, Any]]) -> str:
    loads = [r["host_load_avg_1m"] for r in runs if r.get("host_load_avg_1m") is not None]
    return f"; host load average {min(loads):.1f}–{max(loads):.1f} during these runs" if loads else ""


def _len(spec: Any) -> str:
    if not isinstance(spec, dict):
        return str(spec)
    if spec["min"] == spec["max"]:
        return fmt(spec["min"])
    return f"{fmt(spec['min'])}–{fmt(spec['max'])} (mean {fmt(spec['mean'])})" if "mean" in spec else         f"{fmt(spec['min'])}–{fmt(spec['max'])}"


def _variants_md(report: dict[str, Any]) -> list[str]:
    base = report["variants"].get("baseline", {})
    rows = []
    for name, v in report["variants"].items():
        a, q, nb = v.get("artifact", {}), v.get("quality") or {}, name != "baseline"
        size_delta = delta(a.get("bytes"), get(base, "artifact.bytes")) if nb else ""
        rows.append([f"**{name}**", fmt_bytes(a.get("bytes")) + (f" ({size_delta})" if size_delta else ""),
                     _cell(a.get("parameters"), get(base, "artifact.parameters"), nb),
                     fmt(q.get("kl_divergence")), fmt(q.get("top1_agreement")),
                     _cell(q.get("perplexity"), get(base, "quality.perplexity"), nb), fmt(q.get("greedy_agreement"))])
    header = ["variant", "artifact", "parameters", "KL", "top-1 agree", "perplexity", "greedy agree"]
    src = next((v["quality"].get("source_perplexity") for v in report["variants"].values()
                if (v.get("quality") or {}).get("source_perplexity") is not None), None)
    note = [f"Source model perplexity on the eval tokens: {fmt(src)}.", ""] if src is not None else []
    return ["## Variants", "", table(header, rows), "", *note]


def _placement_md(report: dict[str, Any]) -> list[str]:
    """Only where a variant ran on two devices: without fallback the placement is what was asked for."""
    rows = [[f"**{name}**", p["device"], ", ".join(p["fallback_ops"]), str(p.get("fallback_nodes", "")),
             "yes" if p["allowed"] else "no"]
            for name, v in report["variants"].items() if (p := v.get("placement")) and p["fallback_ops"]]
    if not rows:
        return []
    return ["## CPU fallback", "",
            "onnxruntime ran these variants' nodes on the CPU for want of a kernel on the requested device, so "
            "their MBU and MFU divide partly-CPU time by the device's peaks. Allowed by the recipe's "
            "`serving.allow_cpu_fallback`.", "",
            table(["variant", "device", "ops on the CPU", "nodes", "allowed"], rows), ""]


def _speculative_md(report: dict[str, Any]) -> list[str]:
    rows = [[f"**{name}**", f"{s['method']} K={s['tokens']}" + (f" ({s['draft']})" if s.get("draft") else ""),
             {"engine": "engine (serve)", "run": "recipec run"}.get(s.get("path"), "recipec run"),
             "yes" if s["identical_greedy"] else "**no**", fmt(s["acceptance_rate"]), fmt(s["tokens_per_target_step"]),
             fmt(s["tpot_ms"]["plain"]), fmt(s["tpot_ms"]["speculative"]), fmt(s["tpot_ratio"])]
            for name, v in report["variants"].items() if (s := v.get("speculative"))]
    if not rows:
        return []
    how = ("measured: batch 1, greedy, the first half of each eval window as the prompt, decoded plainly and then "
           "speculatively in the profiling process, through the serving engine over slots (ngram on a shared-buffer "
           "variant) or recipec run's path (a draft model, or a growing cache); TPOT is the median over prompts")
    return ["## Speculative decoding", "", how[0].upper() + how[1:] + ".", "",
            table(["variant", "proposer", "path", "same greedy output", "acceptance", "tokens / target step",
                   "TPOT plain ms", "TPOT speculative ms", "ratio"], rows), "", *_engine_speculation_md(report)]


def _engine_speculation_md(report: dict[str, Any]) -> list[str]:
    """The serving runs' own speculation (the engine's, ngram): per variant and run."""
    rows = [[f"**{name}**", run["batching"], str(run.get("concurrency", run.get("rate_rps"))),
             fmt(s.get("acceptance_rate")) if s["ran"] else f"did not run: {s['why']}",
             fmt(s.get("tokens_per_target_step")) if s["ran"] else "", fmt(run["tpot_ms"]["p50"])]
            for name, v in report["variants"].items() for run in v.get("serving", [])
            if (s := run.get("speculation"))]
    if not rows:
        return []
    return ["The serving runs above speculated in the engine (every row of a batch verified in one forward; "
            "counts include warmup requests):", "",
            table(["variant", "batching", "load", "acceptance", "tokens / target step", "TPOT p50 ms"], rows), ""]


def _gates_md(report: dict[str, Any]) -> list[str]:
    if not report["gates"]:
        return ["## Gates", "", "No gates in the recipe.", ""]
    rows = [["✅" if g["passed"] else "❌", g["metric"], g["variant"],
             f"{'≤' if g.get('op') == 'max' else '≥'} {fmt(g['limit'])}", fmt(g["value"]), g.get("run") or "",
             g.get("reason") or ""] for g in report["gates"]]
    verdict = "all gates passed" if report["gates_passed"] else "**gates failed**"
    return ["## Gates", "", verdict, "", table(["", "metric", "variant", "limit", "value", "run", "reason"], rows), ""]


def _build_md(report: dict[str, Any]) -> list[str]:
    build = report.get("build")
    if not build:
        return []
    rows = [[s["id"], s.get("op", ""), f"{s['seconds']:.1f}", _mib(s.get("peak_rss_mb")),
             "cached" if s.get("cached") else ""] for s in build["stages"]]
    return ["## Build stages", "", table(["stage", "op", "seconds", "peak RSS", ""], rows), "",
            f"Total {build['total_seconds']:.1f} s. Peak RSS: the build process's peak resident set while the stage "
            "ran; a cached stage shows the run that built it.", ""]


def _mib(mb: float | None) -> str:
    return fmt_bytes(None if mb is None else mb * 2**20)


def _hardware_md(report: dict[str, Any]) -> list[str]:
    h = report["hardware"]
    return [f"Device: **{h['device']}** — {h['name']}.  ",
            f"Peak bandwidth {fmt(h['peak_bandwidth_gb_s'])} GB/s ({h['peak_bandwidth_source']}).  ",
            f"Peak compute {fmt(h['peak_tflops'])} TFLOP/s ({h['peak_tflops_source']}).", ""]


def render_markdown(report: dict[str, Any]) -> str:
    r = report["recipe"]
    plots = report.get("plots") or {}
    lines = [f"# recipec report: {r['name']}", "",
             f"Recipe sha256 `{r['sha256'][:16]}…`, recipec {report.get('recipec_version', '')}, "
             f"{report.get('created_at', '')}.", "", *_hardware_md(report), *_variants_md(report),
             *_placement_md(report),
             "## Serving", "", "Changes in parentheses are against `baseline` on the same run.", "",
             *_serving_md(report), *_speculative_md(report), *capacity_md(report), *batch_prompting_md(report),
             *search_md(report), *projections_md(report), *_gates_md(report),
             *_build_md(report)]
    if plots:
        lines += ["## Plots", ""] + [f"![{k}]({p})" for k, p in plots.items() if k != "pareto"] + [""]
    lines += ["## How each number was measured", ""] + [f"- **{k}**: {v}" for k, v in report["methods"].items()]
    return "\n".join(lines) + "\n"
