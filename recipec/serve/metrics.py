"""/metrics: the server's counters, gauges and latency histograms in Prometheus text exposition, under
recipec's names, vLLM's (`recipec serve --metric-names vllm`, so that dashboards built for vLLM work) or both.

vLLM's names are those of its V1 engine (vllm/v1/metrics/loggers.py): every series labelled with
model_name (the served model's id) and engine ("0"; recipec runs one engine), request_success_total by
finished_reason (stop, length, abort: recipec's cancelled and error requests are vLLM's aborts)."""
from __future__ import annotations

import threading
from typing import Sequence

from recipec.runtime.engine import Request
from recipec.runtime.speculative import SpecStats

METRIC_NAMES = ("recipec", "vllm", "both")
# Histogram bounds in seconds, as vLLM's /metrics uses for the same quantities.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
# Why a request was refused before admission: its queue (all of it, or its client's share), a bad request
# (400, 415, a Host not allowed), a body over --max-body-bytes (413), no valid API key (401), a body or
# header that did not arrive in time (408), or a server shutting down (503).
REJECTIONS = ("queue_full", "client_queue_full", "invalid", "too_large", "unauthorized", "timeout",
              "shutting_down")
OUTCOMES = ("stop", "length", "cancelled", "error")
_VLLM_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "abort"}
# A model that states no context length: token-count histograms stop here.
NO_CONTEXT_TOKENS = 32768


class Histogram:
    def __init__(self, bounds: Sequence[float]):
        self.bounds, self.counts, self.sum, self.count = tuple(bounds), [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        pre = f"{labels}," if labels else ""
        out = [f'{name}_bucket{{{pre}le="{b:g}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        suffix = f"{{{labels}}}" if labels else ""
        return out + [f'{name}_bucket{{{pre}le="+Inf"}} {self.count}', f"{name}_sum{suffix} {self.sum:.6f}",
                      f"{name}_count{suffix} {self.count}"]


def token_buckets(largest: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50 … up to `largest`: vLLM's bounds for per-request token counts."""
    out, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > largest:
                return tuple(out)
            out.append(mantissa * scale)
        scale *= 10


class Metrics:
    """Prometheus text exposition of the server's counters, gauges and latency histograms (seconds).
    Updated from the engine thread and read from the event loop, hence the lock."""

    def __init__(self, names: str = "recipec", context_length: int | None = None):
        if names not in METRIC_NAMES:
            raise ValueError(f"metric names must be one of {METRIC_NAMES}, got {names!r}")
        self.names = names
        self.lock = threading.Lock()
        self.finished = {reason: 0 for reason in OUTCOMES}
        self.rejected = {reason: 0 for reason in REJECTIONS}
        self.prompt_tokens = self.generation_tokens = 0
        self.ttft, self.tpot, self.e2e = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS), Histogram(E2E_BUCKETS)
        tokens = token_buckets(context_length or NO_CONTEXT_TOKENS)
        self.prompt_lengths, self.generation_lengths = Histogram(tokens), Histogram(tokens)

    def request_done(self, request: Request, reason: str) -> None:
        with self.lock:
            self._count(reason, len(request.prompt), len(request.tokens))
            times = request.token_times
            if times and reason in ("stop", "length"):
                self.ttft.observe(times[0] - request.arrival)
                self.e2e.observe(times[-1] - request.arrival)
                if len(times) > 1:  # vLLM's TPOT: undefined for one-token outputs
                    self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))

    def scored(self, prompt_tokens: Sequence[int]) -> None:
        """Requests that only scored their prompts (echo with max_tokens 0): they end by length at once."""
        with self.lock:
            for count in prompt_tokens:
                self._count("length", count, 0)

    def _count(self, reason: str, prompt: int, generated: int) -> None:
        self.finished[reason] += 1
        self.prompt_tokens += prompt
        self.generation_tokens += generated
        self.prompt_lengths.observe(prompt)
        self.generation_lengths.observe(generated)

    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] += 1

    def render(self, waiting: int, running: int, info: dict[str, str], speculation: SpecStats | None = None) -> str:
        """`speculation`: the engine's counters when it speculates (the engine thread writes them; ints)."""
        with self.lock:
            lines = self._recipec(waiting, running, info) if self.names != "vllm" else []
            if self.names != "recipec":
                lines += self._vllm(waiting, running, info["model"])
            if speculation is not None:
                lines += self._speculation(speculation, info["model"])
            return "\n".join(lines) + "\n"

    def _speculation(self, stats: SpecStats, model: str) -> list[str]:
        lines = []
        if self.names != "vllm":
            for name, value, what in (
                    ("recipec_spec_decode_proposed_tokens_total", stats.proposed, "tokens prompt lookup proposed"),
                    ("recipec_spec_decode_accepted_tokens_total", stats.accepted, "proposed tokens the target kept"),
                    ("recipec_spec_decode_target_steps_total", stats.target_steps,
                     "target forwards after prefill, per request row (verifications and plain steps)"),
                    ("recipec_spec_decode_emitted_tokens_total", stats.step_tokens, "tokens those forwards emitted")):
                lines += _family(name, "counter", what) + [f"{name} {value}"]
        if self.names != "recipec":
            labels = f'engine="0",model_name="{_escape(model)}"'
            for name, value, what in (
                    ("vllm:spec_decode_num_draft_tokens_total", stats.proposed, "Number of draft tokens."),
                    ("vllm:spec_decode_num_accepted_tokens_total", stats.accepted, "Number of accepted tokens.")):
                lines += _family(name, "counter", what) + [f"{name}{{{labels}}} {value}"]
        return lines

    def _recipec(self, waiting: int, running: int, info: dict[str, str]) -> list[str]:
        labels = ",".join(f'{k}="{_escape(v)}"' for k, v in info.items())
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
        return lines

    def _vllm(self, waiting: int, running: int, model: str) -> list[str]:
        labels = f'engine="0",model_name="{_escape(model)}"'
        lines = _family("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.")
        lines += [f"vllm:num_requests_running{{{labels}}} {running}"]
        lines += _family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.")
        lines += [f"vllm:num_requests_waiting{{{labels}}} {waiting}"]
        lines += _family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.")
        lines += [f"vllm:prompt_tokens_total{{{labels}}} {self.prompt_tokens}"]
        lines += _family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.")
        lines += [f"vllm:generation_tokens_total{{{labels}}} {self.generation_tokens}"]
        lines += _family("vllm:request_success_total", "counter", "Count of successfully processed requests.")
        for reason in ("stop", "length", "abort"):
            count = sum(v for k, v in self.finished.items() if _VLLM_REASONS[k] == reason)
            lines += [f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {count}']
        for name, hist, what in (
                ("vllm:time_to_first_token_seconds", self.ttft, "Histogram of time to first token in seconds."),
                ("vllm:time_per_output_token_seconds", self.tpot, "Histogram of time per output token in seconds."),
                ("vllm:e2e_request_latency_seconds", self.e2e, "Histogram of e2e request latency in seconds."),
                ("vllm:request_prompt_tokens", self.prompt_lengths, "Number of prefill tokens processed."),
                ("vllm:request_generation_tokens", self.generation_lengths, "Number of generation tokens processed.")):
            lines += _family(name, "histogram", what) + hist.lines(name, labels)
        return lines


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
