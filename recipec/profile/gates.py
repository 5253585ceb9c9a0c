"""Recipe gates: `{metric: "tpot_ms.p50", max: 40, variant: int4}` checked against the report.

A metric path names one number of a variant:
- quality: kl_divergence, top1_agreement, perplexity, perplexity_ratio, greedy_agreement
  (also written quality.<name>)
- artifact: artifact.bytes, artifact.parameters, artifact.active_parameters
- serving: ttft_ms|tpot_ms|itl_ms|e2e_latency_ms . mean|p50|p90|p99, request_throughput_rps,
  output_throughput_tok_s, total_throughput_tok_s, goodput_rps, mbu, mbu_step, mfu, mfu_prefill,
  mfu_decode, peak_memory_mb (also written serving.<name>)
- the variant's workload results: capacity_at_slo_rps, batch_prompting.<accuracy_alone, accuracy_batched,
  prompt_tokens_per_request_ratio, time_per_request_ratio, parse_failure_rate>

A variant has one serving run per batching policy and load level; a serving gate must hold on every
run, so its value is the worst one (the largest for `max`, the smallest for `min`). Narrow it with
selectors after `@`: `tpot_ms.p50@concurrency=8`, `output_throughput_tok_s@batching=continuous,rate_rps=2`.

A gate without `variant` applies to every variant except `baseline` (the reference it is compared
with), or to baseline when it is the only variant. A gate whose metric, variant or run is missing
fails, with the reason; a gate never passes on a number that was not measured.
"""
from __future__ import annotations

from typing import Any, Sequence

from recipec.profile.metrics import LATENCY_METRICS, STAT_KEYS

QUALITY = ("kl_divergence", "top1_agreement", "perplexity", "perplexity_ratio", "greedy_agreement")
ARTIFACT = ("bytes", "parameters", "active_parameters")
SCALARS = ("request_throughput_rps", "output_throughput_tok_s", "total_throughput_tok_s", "goodput_rps",
           "mbu", "mbu_step", "mfu", "mfu_prefill", "mfu_decode", "peak_memory_mb")
SELECTORS = {"batching": str, "concurrency": int, "rate_rps": float}
# per variant, measured across its runs: capacity from a rate sweep, batch prompting against alone
WORKLOAD = ("capacity_at_slo_rps",)
BATCH_PROMPTING = ("accuracy_alone", "accuracy_batched", "prompt_tokens_per_request_ratio", "time_per_request_ratio",
                   "parse_failure_rate")


def _parse(path: str) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """(section, key path, selectors); raises ValueError with a message a recipe author can act on."""
    name, _, sel = path.strip().partition("@")
    parts = tuple(p for p in name.split(".") if p)
    if parts and parts[0] in ("quality", "serving"):
        section, parts = parts[0], parts[1:]
    elif parts and parts[0] == "artifact":
        section, parts = "artifact", parts[1:]
    elif parts and parts[0] in WORKLOAD + ("batch_prompting",):
        section = "variant"
    else:
        section = "quality" if parts and parts[0] in QUALITY else "serving"
    _check_parts(section, parts, path)
    selectors = _parse_selectors(sel) if sel else {}
    if selectors and section != "serving":
        raise ValueError(f"selectors (@...) apply to serving metrics only, not {path!r}")
    return section, parts, selectors


def _check_parts(section: str, parts: tuple[str, ...], path: str) -> None:
    ok = {
        "quality": len(parts) == 1 and parts[0] in QUALITY,
        "artifact": len(parts) == 1 and parts[0] in ARTIFACT,
        "variant": parts in [(w,) for w in WORKLOAD] + [("batch_prompting", b) for b in BATCH_PROMPTING],
        "serving": (len(parts) == 1 and parts[0] in SCALARS)
        or (len(parts) == 2 and parts[0] in LATENCY_METRICS and parts[1] in STAT_KEYS),
    }[section]
    if not ok:
        raise ValueError(f"unknown metric {path!r}; known: {', '.join(known_metrics())}")


def _parse_selectors(text: str) -> dict[str, Any]:
    out = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in SELECTORS:
            raise ValueError(f"bad selector {item!r}: use key=value with key in {', '.join(SELECTORS)}")
        try:
            out[key] = SELECTORS[key](value.strip())
        except ValueError:
            raise ValueError(f"bad selector value {item!r}") from None
    return out


def section_of(path: str) -> str:
    """"quality", "artifact" or "serving": where a valid metric path is read from."""
    return _parse(path)[0]


def known_metrics() -> list[str]:
    return ([*QUALITY] + [f"artifact.{a}" for a in ARTIFACT]
            + [f"{d}.{s}" for d in LATENCY_METRICS for s in STAT_KEYS] + [*SCALARS] + [*WORKLOAD]
            + [f"batch_prompting.{b}" for b in BATCH_PROMPTING])


def validate_gate_metric(path: str) -> str | None:
    """None when `path` names a report metric, else the reason it does not."""
    try:
        _parse(path)
    except ValueError as exc:
        return str(exc)
    return None


def _target_variants(gate: dict[str, Any], report: dict[str, Any]) -> list[str]:
    if gate.get("variant"):
        return [gate["variant"]]
    names = list(report.get("variants", {}))
    others = [v for v in names if v != "baseline"]
    return others or names


def lookup(d: Any, keys: Sequence[str]) -> Any:
    """d[k0][k1]..., or None where a level is missing or not a mapping."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _matches(run: dict[str, Any], selectors: dict[str, Any]) -> bool:
    return all(run.get(k) is not None and (run[k] == v if k != "rate_rps" else abs(run[k] - v) < 1e-9)
               for k, v in selectors.items())


def _run_label(run: dict[str, Any]) -> str:
    load = f"concurrency={run['concurrency']}" if run.get("concurrency") is not None else f"rate_rps={run.get('rate_rps')}"
    return f"{run.get('batching')}, {load}"


def _serving_value(variant: dict[str, Any], parts, selectors, op: str) -> tuple[Any, str | None, str | None]:
    """(worst value, run label, reason when there is no value)."""
    runs = [r for r in variant.get("serving") or [] if _matches(r, selectors)]
    if not runs:
        return None, None, "no serving run" + (f" matches {selectors}" if selectors else " was measured")
    values = [(lookup(r, parts), _run_label(r)) for r in runs]
    missing = [label for v, label in values if v is None]
    if missing:
        return None, missing[0], f"not measured in run ({missing[0]})"
    pick = max if op == "max" else min
    return (*pick(values, key=lambda x: x[0]), None)


def _value(variant: dict[str, Any], section: str, parts, selectors, op: str):
    if section == "serving":
        return _serving_value(variant, parts, selectors, op)
    v = lookup(variant if section == "variant" else variant.get(section), parts)
    where = ".".join(parts if section == "variant" else (section, *parts))
    return v, None, None if v is not None else f"{where} was not measured"


def _check(gate: dict[str, Any], name: str, report: dict[str, Any], op: str) -> dict[str, Any]:
    limit = gate[op]
    out = {"metric": gate["metric"], "variant": name, "op": op, "limit": limit, "value": None,
           "passed": False, "run": None, "reason": None}
    variant = report.get("variants", {}).get(name)
    if variant is None:
        return {**out, "reason": f"variant {name!r} is not in the report"}
    try:
        section, parts, selectors = _parse(gate["metric"])
    except ValueError as exc:
        return {**out, "reason": str(exc)}
    value, run, reason = _value(variant, section, parts, selectors, op)
    if reason:
        return {**out, "run": run, "reason": reason}
    passed = value <= limit if op == "max" else value >= limit
    word = "≤" if op == "max" else "≥"
    return {**out, "value": value, "run": run, "passed": passed,
            "reason": None if passed else f"{value:.6g} is not {word} {limit:g}"}


def evaluate_gates(gates: list[dict[str, Any]], report: dict[str, Any]) -> list[dict[str, Any]]:
    """One result per (gate, bound, variant): {metric, variant, op, limit, value, passed, run, reason}."""
    results = []
    for gate in gates:
        for op in ("min", "max"):
            if gate.get(op) is not None:
                results += [_check(gate, v, report, op) for v in _target_variants(gate, report)]
    return results
