"""out/<name>/report.json (validated against schemas/report.schema.json), report.md and its plots,
and `compare` for `recipec compare`.

report.md is what a reviewer reads in a PR: one table per serving run with every variant side by side
and its change against baseline, then quality, gates, build stages, plots and the methods behind the
numbers.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any, Iterable

from . import __version__
from .gates import evaluate_gates, lookup

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "report.schema.json"

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
           "FLOP/s; mfu_prefill and mfu_decode split it by step kind. Step time, not TTFT, because TTFT includes "
           "queueing",
    "peak_memory_mb": "CPU: peak resident set (VmHWM) of a separate serving process, reset before each run; "
                      "CUDA: peak device memory in use (cudaMemGetInfo) sampled every 10 ms, plus the process's "
                      "peak RSS in peak_memory_source",
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
                "Gamma(burstiness) arrival gaps at rate_rps, seeded; random prompt token ids (seeded), "
                "ignore_eos so outputs have the asked length; greedy decoding",
}


def validate_report(report: dict[str, Any]) -> None:
    """Raises jsonschema.ValidationError naming the first field that breaks the schema."""
    import jsonschema

    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(report)


def build_report(recipe: dict[str, Any], hardware: dict[str, Any], variants: dict[str, dict[str, Any]],
                 gates: Iterable[dict[str, Any]] = (), stages: list[dict[str, Any]] | None = None,
                 environment: dict[str, str] | None = None) -> dict[str, Any]:
    """`recipe`: {name, sha256[, path]}; `variants`: id -> profile_variant() result; `gates`: the
    recipe's gate list; `stages`: [{id, op, seconds, cached}] of the build."""
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


# ---------- formatting ----------

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


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


SERVING_COLUMNS = [("TTFT p50 ms", "ttft_ms.p50"), ("TTFT p99 ms", "ttft_ms.p99"), ("TPOT p50 ms", "tpot_ms.p50"),
                   ("TPOT p99 ms", "tpot_ms.p99"), ("ITL p99 ms", "itl_ms.p99"), ("E2E p50 ms", "e2e_latency_ms.p50"),
                   ("req/s", "request_throughput_rps"), ("out tok/s", "output_throughput_tok_s"),
                   ("MBU", "mbu"), ("MFU", "mfu"), ("peak MiB", "peak_memory_mb")]


PERCENT = {"mbu", "mfu", "mbu_step", "mfu_prefill", "mfu_decode"}


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
        rows = [[f"**{name}**"] + [_cell(get(run, p), get(base, p), name != "baseline", p) for _, p in SERVING_COLUMNS]
                for name, run in runs.items()]
        first = next(iter(runs.values()))
        parts += [f"### {run_label(first)}", "",
                  f"{first['num_requests']} requests, prompt {_len(first.get('prompt_tokens'))} tokens, "
                  f"output {_len(first.get('output_tokens'))} tokens, max batch {first['max_batch_size']}"
                  + _load_note(runs.values()), "",
                  _table(["variant"] + [c for c, _ in SERVING_COLUMNS], rows), ""]
    return parts


def _load_note(runs: Iterable[dict[str, Any]]) -> str:
    loads = [r["host_load_avg_1m"] for r in runs if r.get("host_load_avg_1m") is not None]
    return f"; host load average {min(loads):.1f}–{max(loads):.1f} during these runs" if loads else ""


def _len(spec: Any) -> str:
    return f"{spec['min']}–{spec['max']}" if isinstance(spec, dict) else str(spec)


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
    return ["## Variants", "", _table(header, rows), "", *note]


def _gates_md(report: dict[str, Any]) -> list[str]:
    if not report["gates"]:
        return ["## Gates", "", "No gates in the recipe.", ""]
    rows = [["✅" if g["passed"] else "❌", g["metric"], g["variant"],
             f"{'≤' if g.get('op') == 'max' else '≥'} {fmt(g['limit'])}", fmt(g["value"]), g.get("run") or "",
             g.get("reason") or ""] for g in report["gates"]]
    verdict = "all gates passed" if report["gates_passed"] else "**gates failed**"
    return ["## Gates", "", verdict, "", _table(["", "metric", "variant", "limit", "value", "run", "reason"], rows), ""]


def _build_md(report: dict[str, Any]) -> list[str]:
    build = report.get("build")
    if not build:
        return []
    rows = [[s["id"], s.get("op", ""), f"{s['seconds']:.1f}", "cached" if s.get("cached") else ""] for s in build["stages"]]
    return ["## Build stages", "", _table(["stage", "op", "seconds", ""], rows), "",
            f"Total {build['total_seconds']:.1f} s.", ""]


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
             "## Serving", "", "Changes in parentheses are against `baseline` on the same run.", "",
             *_serving_md(report), *_gates_md(report), *_build_md(report)]
    if plots:
        lines += ["## Plots", ""] + [f"![{k}]({p})" for k, p in plots.items()] + [""]
    lines += ["## How each number was measured", ""] + [f"- **{k}**: {v}" for k, v in report["methods"].items()]
    return "\n".join(lines) + "\n"


# ---------- compare ----------

COMPARE_METRICS = ["artifact.bytes", "quality.kl_divergence", "quality.top1_agreement", "quality.perplexity"]


def _row(label: str, a: Any, b: Any) -> str:
    return f"  {label:<28} {fmt(a):>12} {fmt(b):>12} {delta(b, a):>8}"


def _compare_variant(name: str, va: dict[str, Any] | None, vb: dict[str, Any] | None) -> list[str]:
    if va is None or vb is None:
        return [f"{name}: only in {'B' if va is None else 'A'}", ""]
    out = [f"{name}"] + [_row(m, get(va, m), get(vb, m)) for m in COMPARE_METRICS]
    runs_a = {run_key(r): r for r in va.get("serving") or []}
    for r in vb.get("serving") or []:
        ra = runs_a.get(run_key(r))
        if ra is None:
            out.append(f"  [{run_label(r)}] only in B")
            continue
        out.append(f"  [{run_label(r)}]")
        out += [_row(label, get(ra, p), get(r, p)) for label, p in SERVING_COLUMNS]
    return out + [""]


def compare(report_a: dict[str, Any], report_b: dict[str, Any]) -> str:
    """Side by side: A's value, B's value, B's change against A, for every variant and matching run."""
    ha, hb = report_a["hardware"], report_b["hardware"]
    lines = [f"A: {report_a['recipe']['name']} ({report_a['recipe']['sha256'][:12]}) on {ha['name']} [{ha['device']}]",
             f"B: {report_b['recipe']['name']} ({report_b['recipe']['sha256'][:12]}) on {hb['name']} [{hb['device']}]"]
    if (ha["name"], ha["device"]) != (hb["name"], hb["device"]):
        lines.append("warning: measured on different hardware; latency and throughput do not compare")
    lines += ["", f"  {'metric':<28} {'A':>12} {'B':>12} {'B vs A':>8}", ""]
    names = list(dict.fromkeys([*report_a["variants"], *report_b["variants"]]))
    for name in names:
        lines += _compare_variant(name, report_a["variants"].get(name), report_b["variants"].get(name))
    return "\n".join(lines)


# ---------- plots ----------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on build machines; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _plot_latency_throughput(report: dict[str, Any], path: Path, plt) -> bool:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for name, v in report["variants"].items():
        by_policy: dict[str, list[dict[str, Any]]] = {}
        for run in v.get("serving") or []:
            by_policy.setdefault(run["batching"], []).append(run)
        for policy, runs in by_policy.items():
            pts = [(r["output_throughput_tok_s"], get(r, "tpot_ms.p50"), get(r, "ttft_ms.p50")) for r in runs]
            pts = [p for p in pts if None not in p]
            if not pts:
                continue
            x, tpot, ttft = zip(*pts)
            label = f"{name} ({policy})"
            axes[0].plot(x, tpot, marker="o", label=label)
            axes[1].plot(x, ttft, marker="o", label=label)
            drawn = True
    for ax, what in zip(axes, ("TPOT p50 (ms)", "TTFT p50 (ms)")):
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("latency vs throughput across load levels")
    return _save(fig, path, plt, drawn)


def _plot_distributions(report: dict[str, Any], path: Path, plt) -> bool:
    """Per-request TTFT and TPOT of each variant's highest-load run of its first batching policy."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for ax, metric in zip(axes, ("ttft_ms", "tpot_ms")):
        data, labels = [], []
        for name, v in report["variants"].items():
            run = _highest_load(v.get("serving") or [])
            values = (run or {}).get("samples", {}).get(metric) or []
            if values:
                data.append(values)
                labels.append(f"{name}\n{run_label(run)}")
        if data:
            ax.boxplot(data, showfliers=True)
            ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
            drawn = True
        ax.set_ylabel(f"{metric.removesuffix('_ms').upper()} per request (ms)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("TTFT and TPOT distributions")
    return _save(fig, path, plt, drawn)


def _highest_load(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not runs:
        return None
    first = [r for r in runs if r["batching"] == runs[0]["batching"]]
    return max(first, key=lambda r: (r.get("concurrency") or 0, r.get("rate_rps") or 0))


def _plot_stages(report: dict[str, Any], path: Path, plt) -> bool:
    stages = (report.get("build") or {}).get("stages") or []
    if not stages:
        return False
    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.8 + 0.4 * len(stages))))
    ax.barh([s["id"] + (" (cached)" if s.get("cached") else "") for s in stages], [s["seconds"] for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("build time per stage")
    return _save(fig, path, plt, True)


def _save(fig, path: Path, plt, drawn: bool) -> bool:
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def render_plots(report: dict[str, Any], plot_dir: Path) -> dict[str, Path]:
    """PNG files for report.md; a plot with nothing to draw is not written."""
    plt = _pyplot()
    plot_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, fn in (("latency_vs_throughput", _plot_latency_throughput), ("ttft_tpot_distribution", _plot_distributions),
                    ("build_stages", _plot_stages)):
        path = plot_dir / f"{key}.png"
        if fn(report, path, plt):
            out[key] = path
    return out
