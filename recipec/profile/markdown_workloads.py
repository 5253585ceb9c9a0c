"""report.md's workload sections: capacity at the SLO from a rate sweep, and batch prompting against asking
each question alone."""
from __future__ import annotations

from typing import Any

from recipec.profile.formatting import fmt
from recipec.profile.markdown_search import table
from recipec.profile.sweep import GOODPUT_SHARE

METHOD_WORDS = {"measured": "measured", "interpolated": "INTERPOLATED", "not_reached": "at least (every rate held)",
                "below_lowest": "below the lowest rate"}


def _slo_text(report: dict[str, Any]) -> str:
    run = next((r for v in report["variants"].values() for r in v.get("serving") or [] if r.get("slo")), None)
    if run is None:
        return ""
    return ", ".join(f"{k.removesuffix('_ms')} ≤ {fmt(v)} ms" for k, v in run["slo"].items())


def capacity_md(report: dict[str, Any]) -> list[str]:
    rows = [[f"**{name}**", c["batching"], fmt(c["capacity_at_slo_rps"]), METHOD_WORDS[c["method"]],
             _bracket(c), c["note"]]
            for name, v in report["variants"].items() for c in v.get("capacity") or []]
    if not rows:
        return []
    return ["## Capacity at the SLO", "",
            f"The highest offered rate (Poisson arrivals) at which goodput was at least {GOODPUT_SHARE:.0%} of the "
            f"request rate, i.e. at least {GOODPUT_SHARE:.0%} of the requests met every SLO ({_slo_text(report)}). "
            "An INTERPOLATED capacity lies between two tested rates and was not measured itself.", "",
            table(["variant", "batching", "capacity (req/s)", "how", "tested rates around it", "note"], rows), ""]


def _bracket(c: dict[str, Any]) -> str:
    low, high = c["bracket_rps"]
    if high is None:
        return f"{fmt(low)} held; no higher rate tested"
    if c["method"] == "below_lowest":
        return f"{fmt(high)} (the lowest) failed"
    return f"{fmt(low)} held, {fmt(high)} failed"


def batch_prompting_md(report: dict[str, Any]) -> list[str]:
    found = {name: v["batch_prompting"] for name, v in report["variants"].items() if v.get("batch_prompting")}
    if not found:
        return []
    rows = [[f"**{name}**", str(b["size"]), fmt(b["accuracy_alone"]), fmt(b["accuracy_batched"]),
             f"{fmt(b['prompt_tokens_per_request_alone'])} → {fmt(b['prompt_tokens_per_request_batched'])} "
             f"(×{fmt(b['prompt_tokens_per_request_ratio'])})",
             f"{fmt(b['time_per_request_alone_ms'])} → {fmt(b['time_per_request_batched_ms'])} "
             f"(×{fmt(b['time_per_request_ratio'])})", fmt(b["parse_failure_rate"])]
            for name, b in found.items()]
    first = next(iter(found.values()))
    lines = ["## Batch prompting", "",
             f"The same {first['questions']} questions asked alone and {first['size']} to a prompt (shared "
             f"instructions and exemplars, numbered questions, numbered answers split back), "
             f"{first.get('batching', '')} batching, {first.get('concurrency', 1)} client(s), closed loop. Time per "
             "request: the run's duration / questions. Parse failures: batched questions whose numbered answer was "
             "missing.", "",
             table(["variant", "K", "accuracy alone", "accuracy batched", "prompt tokens / request",
                    "ms / request", "parse failures"], rows), ""]
    example = first.get("example")
    if example:
        lines += [f"The first batched prompt and its completion ({next(iter(found))}):", "", "```text",
                  example["prompt"] + example["completion"], "```", ""]
    return lines
