"""The report's `search` block: each trial's objective and constraints read off its measured variant, which
trials are feasible, the Pareto front of quality against the objective, and the recommendation.

Metric paths are the gates' (recipec.profile.gates); a serving metric without a selector is read at the
search's load level (`@concurrency=<search.concurrency>`). A `cost` objective is the variant's projected $ per
million output tokens on the named hardware row (recipec.profile.projections), at the recipe's TPOT SLO.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from recipec.profile.gates import evaluate_gates, section_of

QUALITY_METRIC = "kl_divergence"  # the Pareto front's quality axis: lower is better
COST = "cost"


def objective_of(spec: dict[str, Any]) -> tuple[str, str]:
    """(metric, "minimize" | "maximize")."""
    objective = spec["objective"]
    direction = "minimize" if "minimize" in objective else "maximize"
    return objective[direction], direction


def at_load(metric: str, concurrency: int) -> str:
    """A serving metric read at the search's load level unless it names its own run."""
    if "@" in metric or section_of(metric) != "serving":
        return metric
    return f"{metric}@concurrency={concurrency}"


def before_serving(constraints: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The constraints known before a variant is served (quality and artifact size): a trial that breaks one
    is not profiled."""
    return [c for c in constraints if section_of(c["metric"]) in ("quality", "artifact")]


def check_constraints(name: str, entry: dict[str, Any], constraints: Sequence[dict[str, Any]],
                      concurrency: int) -> list[dict[str, Any]]:
    """The gate results of the constraints on one variant entry (a report's variants.<name>)."""
    gates = [{**c, "metric": at_load(c["metric"], concurrency), "variant": name} for c in constraints]
    return evaluate_gates(gates, {"variants": {name: entry}})


def objective_value(name: str, entry: dict[str, Any], spec: dict[str, Any],
                    cost_of: Callable[[str], float | None] | None = None) -> tuple[float | None, str | None]:
    """(value, reason when there is none)."""
    metric, direction = objective_of(spec)
    if metric == COST:
        value = cost_of(name) if cost_of else None
        return value, None if value is not None else "no projected cost (no price, or no batch meets the SLO)"
    op = "max" if direction == "minimize" else "min"  # the worst run, as a gate reads it
    result = evaluate_gates([{"metric": at_load(metric, spec["concurrency"]), op: 0, "variant": name}],
                            {"variants": {name: entry}})[0]
    if result["value"] is None:
        return None, result["reason"]
    return result["value"], None


def pareto(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names whose (quality loss, objective cost) no other point matches or beats on both with one strictly
    better; both axes are minimized."""
    front = set()
    for name, (q, c) in points.items():
        dominated = any(q2 <= q and c2 <= c and (q2 < q or c2 < c) for other, (q2, c2) in points.items()
                        if other != name)
        if not dominated:
            front.add(name)
    return front


def search_block(spec: dict[str, Any], trials: list[dict[str, Any]], variants: dict[str, dict[str, Any]],
                 not_tried: dict[str, Any], cost_of: Callable[[str], float | None] | None = None) -> dict[str, Any]:
    """`trials`: [{"variant", "params", "pruned": reason | None, "error": why it failed | None}] in the order
    they ran. Every variant of the
    report is a candidate (params {} for those the recipe spells out), so the recommendation can be any."""
    metric, direction = objective_of(spec)
    listed = {t["variant"] for t in trials}
    candidates = trials + [{"variant": v, "params": {}, "pruned": None} for v in variants if v not in listed]
    rows = [_row(t, variants.get(t["variant"], {}), spec, cost_of) for t in candidates]
    sign = 1.0 if direction == "minimize" else -1.0
    points = {r["variant"]: (r["metrics"][QUALITY_METRIC], sign * r["metrics"]["objective"]) for r in rows
              if r["metrics"].get(QUALITY_METRIC) is not None and r["metrics"].get("objective") is not None}
    front = pareto(points)
    for r in rows:
        r["pareto"] = r["variant"] in front
    feasible = [r for r in rows if r["feasible"] and r["metrics"].get("objective") is not None]
    best = min(feasible, key=lambda r: (sign * r["metrics"]["objective"], r["metrics"].get(QUALITY_METRIC) or 0.0,
                                        r["variant"]), default=None)
    return {"strategy": spec["strategy"], "objective": {"metric": metric, "direction": direction,
                                                        "at": f"concurrency={spec['concurrency']}",
                                                        **({"hardware": spec["objective"].get("hardware")}
                                                           if metric == COST else {})},
            "constraints": spec["constraints"], "trials": rows,
            "recommended": best["variant"] if best else None, "not_tried": not_tried}


def _row(trial: dict[str, Any], entry: dict[str, Any], spec: dict[str, Any], cost_of) -> dict[str, Any]:
    name = trial["variant"]
    results = check_constraints(name, entry, spec["constraints"], spec["concurrency"]) if entry else []
    value, reason = objective_value(name, entry, spec, cost_of) if entry and not trial.get("pruned") else (None, None)
    metrics = {"objective": value, QUALITY_METRIC: (entry.get("quality") or {}).get(QUALITY_METRIC)}
    metrics.update({r["metric"]: r["value"] for r in results})
    return {"variant": name, "params": trial["params"], "pruned": trial.get("pruned"), "error": trial.get("error"),
            "feasible": bool(entry) and not trial.get("pruned") and all(r["passed"] for r in results),
            "objective_reason": reason, "constraints": results, "metrics": metrics, "pareto": False}
