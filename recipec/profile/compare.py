"""`recipec compare`: two reports side by side."""
from __future__ import annotations

from typing import Any

from recipec.profile.formatting import SERVING_COLUMNS, delta, fmt, get, run_key, run_label

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
