"""/metrics: the server's counters, gauges and latency histograms in Prometheus text exposition."""
from __future__ import annotations

import threading
from typing import Sequence

from recipec.runtime.engine import Request

# Histogram bounds in seconds, as vLLM's /metrics uses for the same quantities.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
# Why a request was refused before admission: its queue (all of it, or its client's share), a bad request
# (400, 415, a Host not allowed), a body over --max-body-bytes (413), no valid API key (401), a body or
# header that did not arrive in time (408), or a server shutting down (503).
REJECTIONS = ("queue_full", "client_queue_full", "invalid", "too_large", "unauthorized", "timeout", "shutting_down")


class Histogram:
    def __init__(self, bounds: Sequence[float]):
        self.bounds, self.counts, self.sum, self.count = tuple(bounds), [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """Prometheus text exposition of the server's counters, gauges and latency histograms (seconds).
    Updated from the engine thread and read from the event loop, hence the lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.finished = {reason: 0 for reason in ("stop", "length", "cancelled", "error")}
        self.rejected = {reason: 0 for reason in REJECTIONS}
        self.prompt_tokens = self.generation_tokens = 0
        self.ttft, self.tpot, self.e2e = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS), Histogram(E2E_BUCKETS)

    def request_done(self, request: Request, reason: str) -> None:
        with self.lock:
            self.finished[reason] += 1
            self.prompt_tokens += len(request.prompt)
            self.generation_tokens += len(request.tokens)
            times = request.token_times
            if times and reason in ("stop", "length"):
                self.ttft.observe(times[0] - request.arrival)
                self.e2e.observe(times[-1] - request.arrival)
                if len(times) > 1:  # vLLM's TPOT: undefined for one-token outputs
                    self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))

    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] += 1

    def render(self, waiting: int, running: int, info: dict[str, str]) -> str:
        with self.lock:
            labels = ",".join(f'{k}="{v}"' for k, v in info.items())
            lines = [*_family("recipec_info", "gauge", "what this server serves"), f"recipec_info{{{labels}}} 1"]
            lines += _family("recipec_requests_total", "counter", "finished requests by outcome")
            lines += [f'recipec_requests_total{{outcome="{k}"}} {v}' for k, v in self.finished.items()]
            lines += _family("recipec_requests_rejected_total", "counter", "requests refused before admission")
            lines += [f'recipec_requests_rejected_total{{reason="{k}"}} {v}' for k, v in self.rejected.items()]
            lines += _family("recipec_prompt_tokens_total", "counter", "prompt tokens of finished requests")
            lines += [f"recipec_prompt_tokens_total {self.prompt_tokens}"]
            lines += _family("recipec_generation_tokens_total", "counter", "tokens generated for finished requests")
            lines += [f"recipec_generation_tokens_total {self.generation_tokens}"]
            lines += _family("recipec_queue_depth", "gauge", "admitted requests waiting for a batch slot")
            lines += [f"recipec_queue_depth {waiting}"]
            lines += _family("recipec_requests_running", "gauge", "requests holding a batch slot")
            lines += [f"recipec_requests_running {running}"]
            for name, hist, what in (("recipec_time_to_first_token_seconds", self.ttft, "admission to first token"),
                                     ("recipec_time_per_output_token_seconds", self.tpot,
                                      "mean time per output token after the first, per request"),
                                     ("recipec_e2e_request_latency_seconds", self.e2e, "admission to last token")):
                lines += _family(name, "histogram", what) + hist.lines(name)
            return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
