"""`recipec profile --url`: the recipe's serving workload run against an OpenAI-compatible server over
HTTP (a running `recipec serve`, vLLM, ...), measured from the client's side."""
from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from recipec.profile.loadgen import gamma_offsets, make_items
from recipec.profile.profiler import _workload, serving_plan, summarize_raw
from recipec.profile.sweep import expand_runs
from recipec.runtime.engine import POLICIES

Runs = list[dict[str, Any]]


def profile_url(url: str, serving_spec: dict[str, Any], vocab_size: int | None = None,
                log: Callable[[str], None] = lambda s: None, timeout_s: float = 600.0,
                prepare: Callable[[Runs], Runs] = lambda runs: runs) -> Runs:
    """Run the recipe's serving workload (serving_plan: each policy and load level, a `rate_rps: auto` sweep
    expanded as it is measured) against an OpenAI-compatible server and return the runs in the report's shape.
    `prepare` may give the planned runs their prompts (profile.workload.prepare_runs with a build's tokenizer).

    Requests are token-id prompts drawn as the in-process load generator draws them, streamed, with
    ignore_eos (vLLM's extension, which recipec serve honours) so each produces its full output length.
    Times are the client's, from when a request was sent: when it was due or, with every client busy,
    when one took it. The server's steps and memory are not visible from here, so MBU, MFU and peak
    memory are null. When the server is recipec's, the runs carry its batching policy (from /v1/models)
    instead of the recipe's. Raises ValueError when the server cannot be used, RuntimeError when a
    request fails during a run."""
    base = url.rstrip("/")
    model = _remote_model(base)
    vocab = vocab_size or model.get("vocab_size")
    if not vocab:
        raise ValueError(f"{base} does not report its vocabulary size; pass vocab_size")
    client = _HttpClient(base, model["id"], timeout_s)

    def measure(run: dict[str, Any]) -> dict[str, Any]:
        log(f"{base}: " + (f"concurrency {run['concurrency']}" if "concurrency" in run else f"{run['rate_rps']:.3g} req/s"))
        w = _workload(run)
        if w.warmup_requests:
            warm = make_items(w, vocab, w.warmup_requests, seed_offset=10_000)
            client.run(warm, [0.0] * len(warm), run.get("concurrency") or len(warm))
        items = make_items(w, vocab, w.num_requests)
        if "concurrency" in run:
            records = client.run(items, [0.0] * len(items), run["concurrency"])
        else:
            offsets = gamma_offsets(len(items), run["rate_rps"], run["burstiness"], w.seed)
            records = client.run(items, offsets, run.get("max_concurrency") or len(items))
        return {"run": run, "records": records, "steps": [], "peak_memory_mb": None,
                "peak_memory_source": f"not measured: a remote server ({base})", "host_load_avg_1m": None}

    # batch prompting needs text in and out: it is measured in-process only
    planned = [r for r in prepare(serving_plan(_with_remote_policy(serving_spec, model))) if not r.get("batch_prompting")]
    return [summarize_raw(raw, None, None, serving_spec.get("slo")) for raw in expand_runs(planned, measure, log)]


def _remote_model(base: str) -> dict[str, Any]:
    try:
        status, body = _get(base + "/v1/models")
    except OSError as exc:
        raise ValueError(f"cannot reach {base}: {exc}") from None
    if status != 200:
        raise ValueError(f"{base}/v1/models answered HTTP {status}: is this an OpenAI-compatible server?")
    data = json.loads(body).get("data") or []
    if not data:
        raise ValueError(f"{base}/v1/models lists no model")
    return data[0]


def _with_remote_policy(spec: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """The spec with the server's batching when it reports one: a server runs one policy, however many
    the recipe compares."""
    remote = model.get("batching")
    if not isinstance(remote, dict) or remote.get("policy") not in POLICIES:
        return spec
    batching = {key: remote[key] for key in ("max_batch_size", "max_wait_ms", "max_tokens_per_step")
                if remote.get(key) is not None}
    return {**spec, "batching": {**batching, "policy": remote["policy"]}}


def _get(url: str) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
    try:
        conn.request("GET", parts.path or "/")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class _HttpClient:
    """Sends items from `cap` client threads, item i no earlier than start + offsets[i]. A request arrives
    when it is sent: when it was due or, when every client was busy, when one took it (loadgen's _Slots)."""

    def __init__(self, base: str, model: str, timeout_s: float):
        self.parts, self.model, self.timeout_s = urlsplit(base), model, timeout_s

    def run(self, items, offsets: Sequence[float], cap: int) -> list[dict[str, Any]]:
        todo = sorted(zip(offsets, range(len(items))))
        lock, records, errors = threading.Lock(), [None] * len(items), []
        start = time.perf_counter()

        def client() -> None:
            while not errors:
                with lock:
                    if not todo:
                        return
                    offset, i = todo.pop(0)
                time.sleep(max(0.0, start + offset - time.perf_counter()))
                try:
                    records[i] = self._one(items[i], time.perf_counter())
                except (OSError, RuntimeError, ValueError) as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(max(1, min(cap, len(items))))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"a request to {self.parts.geturl()} failed: {errors[0]}")
        return records

    def _one(self, item, arrival: float) -> dict[str, Any]:
        body = json.dumps({"model": self.model, "prompt": item.prompt, "max_tokens": item.output_len,
                           "temperature": 0, "stream": True, "ignore_eos": True})
        conn = http.client.HTTPConnection(self.parts.hostname, self.parts.port or 80, timeout=self.timeout_s)
        times: list[float] = []
        try:
            conn.request("POST", (self.parts.path or "") + "/v1/completions", body,
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
            for line in response:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                now = time.perf_counter()
                choices = json.loads(line[6:]).get("choices") or [{}]
                # A server may stream several tokens in one event; each gets the event's time.
                times += [now] * len(choices[0].get("token_ids") or ([0] if choices[0].get("text") else []))
        finally:
            conn.close()
        return {"arrival": arrival, "token_times": times, "n_in": len(item.prompt), "cancelled": False}
