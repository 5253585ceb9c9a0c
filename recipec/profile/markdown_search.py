"""report.md's search and projection sections: the trials with the recommendation and why, and a short table
of PROJECTED numbers on other hardware."""
from __future__ import annotations

import json
from typing import Any

from recipec.profile.formatting import fmt


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def search_md(report: dict[str, Any]) -> list[str]:
    search = report.get("search")
    if not search:
        return []
    objective = search["objective"]
    goal = f"{objective['direction']} `{objective['metric']}` at {objective['at']}"
    constraints = ", ".join(f"`{c['metric']}` {'≤ ' + fmt(c['max']) if 'max' in c else ''}"
                            f"{' ≥ ' + fmt(c['min']) if 'min' in c else ''}" for c in search["constraints"]) or "none"
    best = search["recommended"]
    lines = ["## Search", "", f"Strategy {search['strategy']}: {goal}; constraints: {constraints}.", "",
             (f"**Recommended: `{best}`**, the feasible trial with the best objective." if best else
              "**No trial is feasible**: each breaks a constraint or was not measured."), ""]
    rows = [[f"`{t['variant']}`" + (" ★" if t["variant"] == best else ""), _params(t["params"]),
             fmt(t["metrics"].get("objective")), fmt(t["metrics"].get("kl_divergence")),
             "yes" if t["feasible"] else "no", "yes" if t["pareto"] else "", _why(t)] for t in search["trials"]]
    lines += [table(["variant", "params", objective["metric"], "KL", "feasible", "Pareto", "notes"], rows), ""]
    left = search["not_tried"]
    if left["count"]:
        lines += [f"Not tried: {left['count']} of {left['space_size']} trials (the budget ended first)"
                  + (f": {', '.join(left['variants'][:10])}" + ("…" if len(left["variants"]) > 10 else "")
                     if left["variants"] else "") + ".", ""]
    elif left["space_size"] is None:
        lines += [f"The space is continuous (a range without a step): {left['tried']} points were tried.", ""]
    if (report.get("plots") or {}).get("pareto"):
        lines += [f"![pareto]({report['plots']['pareto']})", ""]
    return lines


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items()) or "(as the recipe says)"


def _why(trial: dict[str, Any]) -> str:
    if trial.get("error"):
        return f"failed: {trial['error']}"
    if trial.get("pruned"):
        return trial["pruned"]
    broken = [f"{c['metric']}: {c['reason']}" for c in trial.get("constraints") or [] if not c["passed"]]
    return "; ".join(broken) or (trial.get("objective_reason") or "")


def projections_md(report: dict[str, Any]) -> list[str]:
    """TP 1 at batch 1 and at the largest batch that fits, on every hardware row, for the recommended variant
    (or every variant when nothing was searched)."""
    rows = report.get("projections") or []
    if not rows:
        return []
    focus = (report.get("search") or {}).get("recommended")
    wanted = [r for r in rows if r["tensor_parallel"] == 1 and (focus is None or r["variant"] == focus)]
    cells = [[f"`{r['variant']}`", r["hardware"], str(r["batch_size"]), fmt(r["tpot_ms"]), fmt(r["ttft_ms"]),
              fmt(r["output_tok_s"]), fmt(r["usd_per_mtok"]), _assumed(r)] for r in wanted]
    return ["## Projections (PROJECTED, not measured)", "",
            "A roofline model fed with each variant's bytes and FLOPs per token and the efficiencies measured on "
            "this machine (docs/metrics.md, Projections); report.json `projections` has every tensor-parallel degree.", "",
            table(["variant", "hardware", "batch", "TPOT ms", "TTFT ms", "out tok/s", "$/Mtok", "assumed MBU / MFU"],
                  cells), ""]


def _assumed(row: dict[str, Any]) -> str:
    a = row.get("assumed") or {}
    if not a:
        return "–"
    mark = lambda measured: "measured" if measured else "default"  # noqa: E731
    return f"{a['mbu']:.2f} ({mark(a['mbu_measured'])}) / {a['mfu']:.2f} ({mark(a['mfu_measured'])})"
