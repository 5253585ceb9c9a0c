"""Rate sweeps and the capacity they measure.

`rate_rps: auto` is GuideLLM's sweep profile (guidellm/benchmark/profiles.py, SweepProfile): one synchronous
run (a single client, one request at a time) measures the rate the server sustains unloaded, one run with every
request in flight at once (throughput) measures its saturation, and the rest of the sweep are Poisson rates
evenly spaced from the first up to the second (numpy.linspace(sync, max, size - 1)[1:]).

Capacity at the SLO is read off the rate runs: the highest offered rate at which goodput is at least 90% of the
request rate, i.e. at which 90% of the requests met every SLO.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np

from recipec.profile.metrics import throughput_summary
from recipec.runtime.records import RequestRecord

GOODPUT_SHARE = 0.9  # a rate is held when goodput >= 90% of the request rate
# Bracketing rates further apart than this (relative to the lower) do not locate the limit well enough to
# report the lower one: the capacity is then interpolated between them, and says so.
COARSE_GAP = 0.10


def sweep_rates(synchronous_rps: float, throughput_rps: float, size: int) -> list[float]:
    """The Poisson rates of an auto sweep of `size` runs: size - 2 rates from above the synchronous rate up
    to the throughput rate, as GuideLLM spaces them."""
    rates = np.linspace(synchronous_rps, throughput_rps, size - 1)[1:]
    return [float(r) for r in rates if r > 0]


def expand_runs(runs: Sequence[dict[str, Any]], measure: Callable[[dict[str, Any]], dict[str, Any]],
                log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Each planned run measured (`measure(run)` -> its raw result with `records`), an auto sweep's placeholder
    expanded into its runs as the earlier ones are measured."""
    out = []
    for run in runs:
        out += _auto_sweep(run, measure, log) if run.get("rate_rps") == "auto" else [measure(run)]
    return out


def _auto_sweep(run: dict[str, Any], measure, log) -> list[dict[str, Any]]:
    base = {k: v for k, v in run.items() if k not in ("rate_rps", "sweep_size", "burstiness", "max_concurrency")}
    sync = measure({**base, "concurrency": 1, "sweep": "synchronous"})
    most = run.get("max_concurrency") or run["num_requests"]
    full = measure({**base, "concurrency": int(most), "sweep": "throughput"})
    low, high = measured_rate(sync), measured_rate(full)
    if not low or not high:
        raise RuntimeError("the sweep's synchronous or throughput run completed no request: no rates to sweep")
    rates = sweep_rates(low, high, run["sweep_size"])
    log(f"sweep: synchronous {low:.3g} req/s, throughput {high:.3g} req/s; Poisson rates "
        + ", ".join(f"{r:.3g}" for r in rates))
    return [sync, full] + [measure({**base, "rate_rps": r, "burstiness": run["burstiness"],
                                    "max_concurrency": run.get("max_concurrency"), "sweep": "poisson"})
                           for r in rates]


def measured_rate(raw: dict[str, Any]) -> float | None:
    """Completed requests / duration of a raw run."""
    return throughput_summary([RequestRecord(**r) for r in raw["records"]])["request_throughput_rps"]


def held(run: dict[str, Any]) -> bool | None:
    """Whether a run's goodput is at least GOODPUT_SHARE of its request rate; None without an SLO."""
    good, rate = run.get("goodput_rps"), run.get("request_throughput_rps")
    if good is None or not rate:
        return None
    return good >= GOODPUT_SHARE * rate - 1e-12


def attainment(run: dict[str, Any]) -> float | None:
    good, rate = run.get("goodput_rps"), run.get("request_throughput_rps")
    return None if good is None or not rate else good / rate


def capacity(runs: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """Capacity at the SLO from one policy's runs with an offered rate (None without an SLO or such runs):
    {capacity_at_slo_rps, method, bracket_rps, note}. Methods: `measured` (the highest rate held, the next
    tested rate within COARSE_GAP above it failed), `interpolated` (linear in goodput / request rate between the
    highest rate held and the next, failing, one), `not_reached` (every rate held: the highest is a lower
    bound), `below_lowest` (no rate held: null)."""
    points = sorted((r["rate_rps"], attainment(r)) for r in runs
                    if isinstance(r.get("rate_rps"), (int, float)) and attainment(r) is not None)
    if not points:
        return None
    ok = [i for i, (_, a) in enumerate(points) if a >= GOODPUT_SHARE - 1e-12]
    if not ok:
        return {"capacity_at_slo_rps": None, "method": "below_lowest", "bracket_rps": [0.0, points[0][0]],
                "note": f"no tested rate held the SLO; the lowest, {points[0][0]:.3g} req/s, met it for "
                        f"{points[0][1]:.0%} of requests"}
    lo = ok[-1]
    (r_lo, a_lo) = points[lo]
    above = points[lo + 1:]
    if not above:
        return {"capacity_at_slo_rps": r_lo, "method": "not_reached", "bracket_rps": [r_lo, None],
                "note": f"every tested rate held the SLO: capacity is at least {r_lo:.3g} req/s"}
    r_hi, a_hi = above[0]
    if r_hi - r_lo <= COARSE_GAP * r_lo:
        return {"capacity_at_slo_rps": r_lo, "method": "measured", "bracket_rps": [r_lo, r_hi],
                "note": f"{r_lo:.3g} req/s held the SLO, {r_hi:.3g} req/s did not"}
    value = r_lo + (a_lo - GOODPUT_SHARE) / (a_lo - a_hi) * (r_hi - r_lo)
    return {"capacity_at_slo_rps": float(value), "method": "interpolated", "bracket_rps": [r_lo, r_hi],
            "note": f"interpolated between {r_lo:.3g} req/s ({a_lo:.0%} of requests met the SLO) and {r_hi:.3g} "
                    f"req/s ({a_hi:.0%}), linearly in that share: not a measured rate"}


def variant_capacity(serving: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One capacity per batching policy that has rate runs with an SLO, in the order of the runs."""
    out = []
    for policy in dict.fromkeys(r["batching"] for r in serving):
        found = capacity(r for r in serving if r["batching"] == policy)
        if found is not None:
            out.append({"batching": policy, **found})
    return out
