"""The PNG plots report.md links: latency against throughput, per-request latency distributions, build
time per stage, a search's Pareto front, and each variant's projected roofline."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from recipec.profile.formatting import get, run_label


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


def _plot_latency_vs_rate(report: dict[str, Any], path: Path, plt) -> bool:
    """TTFT p99, TPOT p99 and goodput against the offered rate of each variant's Poisson runs, its capacity at
    the SLO marked; a line per variant (and batching policy, when several were measured)."""
    if not any(r.get("rate_rps") is not None for v in report["variants"].values() for r in v.get("serving") or []):
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    drawn, top, slo = False, 0.0, {}
    for i, (name, v) in enumerate(report["variants"].items()):
        runs = [r for r in v.get("serving") or [] if r.get("rate_rps") is not None]
        policies = list(dict.fromkeys(r["batching"] for r in runs))
        for j, policy in enumerate(policies):
            pts = sorted((r["rate_rps"], get(r, "ttft_ms.p99"), get(r, "tpot_ms.p99"), r.get("goodput_rps"))
                         for r in runs if r["batching"] == policy)
            label, style = name + (f" ({policy})" if len(policies) > 1 else ""), ("-", "--", ":")[j % 3]
            for ax, k in zip(axes, (1, 2, 3)):
                xy = [(p[0], p[k]) for p in pts if p[k] is not None]
                if xy:
                    ax.plot(*zip(*xy), marker="o", linestyle=style, color=f"C{i}", label=label)
                    drawn = True
            top = max([top] + [p[0] for p in pts])
            slo = next((r["slo"] for r in runs if r.get("slo")), slo)
        for c in v.get("capacity") or []:
            if c["capacity_at_slo_rps"] is not None:
                for ax in axes:
                    ax.axvline(c["capacity_at_slo_rps"], color=f"C{i}", alpha=0.4, linestyle=":")
    for ax, key in zip(axes[:2], ("ttft_ms", "tpot_ms")):
        if key in slo:
            ax.axhline(slo[key], color="gray", linestyle="--", label=f"SLO {slo[key]:g} ms")
    if top:  # goodput can exceed it: a short run's Poisson arrivals may come faster than their mean rate
        axes[2].plot([0, top], [0, top], color="gray", linestyle="--", label="offered rate")
    for ax, what in zip(axes, ("TTFT p99 (ms)", "TPOT p99 (ms)", "goodput (req/s)")):
        ax.set(xlabel="offered rate (req/s)", ylabel=what)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("latency and goodput against the offered rate (dotted: capacity at the SLO)")
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


def _plot_pareto(report: dict[str, Any], path: Path, plt) -> bool:
    """Each trial's quality (KL) against the objective, sized by artifact bytes; the front drawn, the
    recommendation ringed, trials pruned or unmeasured left out."""
    search = report.get("search")
    points = [t for t in (search or {}).get("trials", [])
              if t["metrics"].get("objective") is not None and t["metrics"].get("kl_divergence") is not None]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    size = {n: (v.get("artifact") or {}).get("bytes") or 0 for n, v in report["variants"].items()}
    largest = max(size.values()) or 1
    for t in points:
        x, y = t["metrics"]["objective"], t["metrics"]["kl_divergence"]
        ax.scatter(x, y, s=30 + 270 * size.get(t["variant"], 0) / largest, alpha=0.6,
                   color="C2" if t["feasible"] else "C3")
        ax.annotate(t["variant"], (x, y), fontsize=6)
    front = sorted((t["metrics"]["objective"], t["metrics"]["kl_divergence"]) for t in points if t["pareto"])
    if front:
        ax.plot(*zip(*front), color="C0", linestyle="--", label="Pareto front")
    best = next((t for t in points if t["variant"] == search.get("recommended")), None)
    if best:
        ax.scatter(best["metrics"]["objective"], best["metrics"]["kl_divergence"], s=400, facecolors="none",
                   edgecolors="black", label=f"recommended: {best['variant']}")
    objective = search["objective"]
    ax.set(xlabel=f"{objective['metric']} ({objective['direction']}, {objective['at']})",
           ylabel="KL divergence from the source (nats)",
           title="search: quality against the objective (green feasible, red not; size = artifact bytes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path, plt, True)


def _plot_roofline(rows: list[dict[str, Any]], path: Path, plt) -> bool:
    """One variant's PROJECTED decode steps on each hardware row's roofline (TP 1): x = FLOPs per byte read,
    y = TFLOP/s per device, at batch 1 (o) and the largest batch that fits (^)."""
    import numpy as np

    points = [r for r in rows if r["fits"] and r["tensor_parallel"] == 1 and r.get("achieved")]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    x = np.logspace(-1, 4, 200)
    for i, hw in enumerate(sorted({r["hardware"] for r in points})):
        group = [r for r in points if r["hardware"] == hw]
        peaks = group[0]["peaks"]
        ax.plot(x, np.minimum(peaks["bandwidth_gb_s"] * x / 1e3, peaks["tflops"]), color=f"C{i}",
                label=f"{hw} ({peaks['dtype']})")  # GB/s x FLOP/B = GFLOP/s
        for r in group:
            a = r["achieved"]
            ax.scatter(a["arithmetic_intensity"], a["tflops"], color=f"C{i}", marker="o" if r["batch_size"] == 1 else "^")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte read)", ylabel="TFLOP/s per device",
           title=f"{points[0]['variant']}: PROJECTED decode roofline (TP 1), batch 1 (o), largest batch (^)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
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
                    ("latency_vs_rate", _plot_latency_vs_rate), ("build_stages", _plot_stages)):
        path = plot_dir / f"{key}.png"
        if fn(report, path, plt):
            out[key] = path
    if _plot_pareto(report, plot_dir / "pareto.png", plt):
        out["pareto"] = plot_dir / "pareto.png"
    for variant in report["variants"]:
        rows = [r for r in report.get("projections") or [] if r["variant"] == variant]
        if _plot_roofline(rows, plot_dir / f"roofline-{variant}.png", plt):
            out[f"roofline-{variant}"] = plot_dir / f"roofline-{variant}.png"
    return out
