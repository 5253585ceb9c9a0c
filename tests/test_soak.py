"""A soak test of `recipec serve` on loopback: many concurrent clients for a bounded time, with random
prompt lengths, streamed and whole completions, clients that disconnect mid-stream, before reading or in
the middle of their body, malformed bodies (lone surrogates and wrong content types among them), bodies
over the size limit, clients too slow to send their headers or body, and greedy requests at a tiny
temperature. The server must stay up, answer each request with the right status (200; 400 or 415 for every
malformed body, 413 for every oversized one, 408 for every stalled body; 429 with Retry-After only when
its queue, or its client's share of it, is full; never a 5xx), account for every admitted request in
/metrics, give every completed greedy request the tokens that request gets when served alone, log no
traceback, and come back to within 10% of its starting memory once the load is over.

The default run is a 3 s warm-up and 10 s of load (~25 s with the checks); `pytest -m slow
tests/test_soak.py` runs a minute of load with twice the clients.
"""
from __future__ import annotations

import http.client
import json
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port

CONTEXT = 256
MAX_BATCH, MAX_QUEUE = 4, 6
SERVING = {"device": "cpu", "threads": 1,
           "batching": {"policy": "continuous", "max_batch_size": MAX_BATCH, "max_wait_ms": 5, "max_tokens_per_step": 4096},
           "workload": {"prompt_tokens": 6, "output_tokens": 4, "requests": 3, "warmup_requests": 1,
                        "concurrency": [1], "seed": 0}}
# RSS may sit this far above its post-warm-up level once the load is over (issue #21: within 10%):
# onnxruntime's CPU arena and glibc's malloc keep freed blocks for reuse, so RSS does not fall back
# exactly. A leak of a few KiB per request is too small for RSS to pin down in a bounded run:
# test_the_service_keeps_no_memory_per_request_served finds that with tracemalloc.
RSS_SLACK = 0.10
# The server's timeouts for slow clients, short so that the soak's slow clients finish within its time.
HEADER_TIMEOUT_S = BODY_TIMEOUT_S = 1
OVERSIZED = 3 * 1024 * 1024  # over the default --max-body-bytes (2 MiB)
WARM_UP_S = 3
VOCAB = 256


def _rss_mib(pid: int, field_name: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field_name} for pid {pid}")


@pytest.fixture(scope="module")
def served(tmp_path_factory, export_op):
    """A tiny Llama (word-level tokenizer, 256 positions) exported and served with continuous batching."""
    from conftest import make_tiny_model

    model = make_tiny_model("llama", tmp_path_factory.mktemp("soak-torch"), tokenizer=True,
                            max_position_embeddings=CONTEXT)
    variant = tmp_path_factory.mktemp("soak-onnx")
    export_op(model, variant)
    root = tmp_path_factory.mktemp("soak-build")
    shutil.copytree(variant, root / "variants" / "baseline")
    manifest = {"recipe": {"name": "soak", "file": "soak.yaml", "sha256": "0", "resolved": {"serving": SERVING}},
                "variants": {"baseline": {"stage": "baseline"}}, "device": "cpu"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    port = free_port()
    # stderr to a file, not a pipe: nobody reads a pipe during the load, and a full one would block the server.
    log = root / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "recipec.cli", "serve", str(root), "--port", str(port),
                             "--max-queue", str(MAX_QUEUE), "--header-timeout", str(HEADER_TIMEOUT_S),
                             "--body-timeout", str(BODY_TIMEOUT_S)], stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            pytest.fail(f"recipec serve exited {proc.returncode}: {log.read_text()}")
        try:
            if _request(port, "GET", "/health")[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("recipec serve did not become healthy within 90 s")
        time.sleep(0.2)
    yield {"port": port, "proc": proc, "log": log}
    proc.kill()
    proc.wait()


def _request(port: int, method: str, path: str, body: bytes | None = None,
             content_type: str | None = "application/json", timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if body is not None and content_type else {}
        conn.request(method, path, body, headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def _metrics(port: int) -> dict[str, float]:
    status, _, text = _request(port, "GET", "/metrics")
    assert status == 200
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in text.decode().splitlines() if line and not line.startswith("#"))}


MALFORMED: list[bytes] = [
    b"{not json", b"", b"[1, 2]", b'"prompt"', b"null", b'{"prompt": [1, 2]', b"\xff\xfe{}", b'{"prompt": "w5",}',
    b'{"prompt": [1, -5]}', b'{"prompt": [1, 99999]}', b'{"prompt": [1], "max_tokens": "7"}',
    b'{"prompt": [1], "max_tokens": 0}', b'{"prompt": [1], "temperature": 9}', b'{"prompt": [1], "stream": "yes"}',
    b'{"prompt": [[1], "w2"]}', b'{"prompt": [1.5]}', b'{"prompt": [true]}', b'{"prompt": {}}',
    b'{"prompt": [1], "max_tokens": 1000000}', b'{"prompt": [1], "top_p": 0}', b'{"prompt": [1], "seed": -1}',
    b'{"prompt": [1], "n": 129}', b'{"prompt": [1], "stream_options": 3}', b'{"prompt": [1], "logit_bias": {"5": 1}}',
    b'{"prompt": "w5 \\ud800 w6"}', b'{"prompt": ["w5 \\udfff"], "max_tokens": 2}',
    b'{"prompt": [1], "stream_options": []}',
    b'{"prompt": [1], "stream": true, "stream_options": {"include_usage": "no"}}',
]
# Sent with these Content-Types instead of application/json: 415, counted as invalid like a malformed body.
WRONG_TYPES = ["text/plain", "application/x-www-form-urlencoded", None]
# Temperatures that mean greedy: below the floor a tiny one is greedy too (it gave NaN, then token 0).
GREEDY_TEMPERATURES = [0, 0, 1e-310, 1e-9]
# Python's json parser raises RecursionError, not ValueError, on deep nesting: a test of its own below,
# so that the soak's other checks still run while it fails.
DEEP_JSON = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@dataclass
class Tally:
    """What the clients saw, shared between their threads."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter = field(default_factory=Counter)  # (kind, status) -> count
    greedy: list[tuple[tuple, list[int]]] = field(default_factory=list)  # ((prompt, max_tokens, ignore_eos), tokens)
    admitted: int = 0  # requests the server took in (answered 200, or cut off by their client after sending)
    malformed: int = 0  # 400 or 415: counted as invalid
    oversized: int = 0  # 413: too_large
    stalled: int = 0  # 408: timeout
    problems: list[str] = field(default_factory=list)

    def saw(self, kind: str, status: int) -> None:
        with self.lock:
            self.statuses[(kind, status)] += 1


def _prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 48))]


def _body(prompt, max_tokens: int, ignore_eos: bool, **extra) -> bytes:
    return json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos,
                       **extra}).encode()


def _head(length: int, content_type: bytes = b"application/json") -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + content_type
            + b"\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n")


def _greedy(port: int, rng: random.Random, tally: Tally, stream: bool) -> None:
    prompt, max_tokens, ignore_eos = _prompt(rng), rng.randint(1, 16), rng.random() < 0.5
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        body = _body(prompt, max_tokens, ignore_eos, stream=stream, temperature=rng.choice(GREEDY_TEMPERATURES))
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        kind = "stream" if stream else "whole"
        tally.saw(kind, r.status)
        if r.status == 429:
            answer = json.loads(r.read())
            if r.getheader("Retry-After") != "1" or answer["error"]["type"] != "rate_limit_error":
                tally.problems.append(f"429 without Retry-After or rate_limit_error: {answer}")
            _back_off(rng)
            return
        if r.status != 200:
            tally.problems.append(f"{kind} greedy request answered {r.status}: {r.read()[:300]!r}")
            return
        if stream:
            events = [line[6:].strip() for line in r if line.startswith(b"data: ")]
            if events[-1:] != [b"[DONE]"]:
                tally.problems.append(f"stream did not end with [DONE]: {events[-3:]}")
                return
            chunks = [json.loads(e) for e in events[:-1]]
            tokens = [t for c in chunks if c["choices"] for t in c["choices"][0]["token_ids"]]
            reason = chunks[-1]["choices"][0]["finish_reason"]
        else:
            choice = json.loads(r.read())["choices"][0]
            tokens, reason = choice["token_ids"], choice["finish_reason"]
        if not 1 <= len(tokens) <= max_tokens or reason not in ("stop", "length") or \
                (ignore_eos and len(tokens) != max_tokens):
            tally.problems.append(f"{len(tokens)} tokens for max_tokens {max_tokens} (ignore_eos {ignore_eos}), {reason}")
        with tally.lock:
            tally.admitted += 1
            tally.greedy.append(((tuple(prompt), max_tokens, ignore_eos), tokens))
    finally:
        conn.close()


def _back_off(rng: random.Random) -> None:
    # What a client told to retry later does; without it the refused clients spin and the load ends in seconds.
    time.sleep(rng.uniform(0.05, 0.3))


def _stream_and_hang_up(port: int, rng: random.Random, tally: Tally) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", _body(_prompt(rng), 200, True, stream=True),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        tally.saw("hang-up stream", r.status)
        if r.status == 200:
            with tally.lock:
                tally.admitted += 1
            for _ in range(rng.randint(1, 4)):
                r.readline()
        else:
            r.read()
            _back_off(rng)
    finally:
        conn.sock and conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()


def _send_and_hang_up(port: int, rng: random.Random, tally: Tally) -> None:
    """A whole completion whose client closes the socket without reading: the server notices within
    half a second and cancels it. Whether it was admitted or refused (429) shows in /metrics only."""
    body = _body(_prompt(rng), 200, True)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(_head(len(body)) + body)
        time.sleep(rng.uniform(0.0, 0.3))
    tally.saw("hang-up whole", 0)


def _hang_up_mid_body(port: int, rng: random.Random, tally: Tally) -> None:
    """Half a body, then the socket closes: nothing to answer, and nothing to log (it was a traceback)."""
    body = _body(_prompt(rng), 8, True)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(_head(len(body)) + body[:len(body) // 2])
        time.sleep(rng.uniform(0.0, 0.1))
    tally.saw("hang-up mid-body", 0)


def _malformed(port: int, rng: random.Random, tally: Tally) -> None:
    body = rng.choice(MALFORMED)
    content_type = rng.choice(WRONG_TYPES) if rng.random() < 0.2 else "application/json"
    status, _, answer = _request(port, "POST", "/v1/completions", body, content_type)
    tally.saw("malformed", status)
    with tally.lock:
        tally.malformed += 1
    expected = 400 if content_type == "application/json" else 415
    if status != expected:
        tally.problems.append(f"malformed body {body[:40]!r} ({content_type}) answered {status}: {answer[:200]!r}")
        return
    error = json.loads(answer)["error"]
    if error["type"] != "invalid_request_error" or not error["message"]:
        tally.problems.append(f"{status} not in OpenAI's error shape: {error}")


def _exchange(port: int, data: bytes, wait: float) -> tuple[bytes, float]:
    """Send `data` on a raw connection; what comes back before the server closes it, and after how long."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        start = time.monotonic()
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out, time.monotonic() - start


def _oversized(port: int, rng: random.Random, tally: Tally) -> None:
    """A body over --max-body-bytes, announced and not sent: 413 from the headers alone."""
    answer, _ = _exchange(port, _head(OVERSIZED + rng.randrange(1 << 20)), wait=10)
    tally.saw("oversized", int(answer[9:12] or 0))
    with tally.lock:
        tally.oversized += 1
    if not answer.startswith(b"HTTP/1.1 413 "):
        tally.problems.append(f"an oversized body answered {answer[:100]!r}")


def _slow(port: int, rng: random.Random, tally: Tally) -> None:
    """A client that stops halfway through its headers (closed, no answer) or its body (408)."""
    body = _body(_prompt(rng), 4, True)
    if rng.random() < 0.5:
        answer, seconds = _exchange(port, _head(len(body))[:rng.randint(1, 40)], wait=10)
        kind, expected = "slow headers", b""
    else:
        answer, seconds = _exchange(port, _head(len(body)) + body[:len(body) // 2], wait=10)
        kind, expected = "slow body", b"HTTP/1.1 408 "
        with tally.lock:
            tally.stalled += 1
    tally.saw(kind, int(answer[9:12] or 0))
    answered_right = answer.startswith(expected) if expected else answer == b""
    if not answered_right or not 0.5 < seconds < 5:  # closed at its timeout (1 s), not at once, not never
        tally.problems.append(f"{kind}: answered {answer[:100]!r} after {seconds:.1f} s")


def _sampled(port: int, rng: random.Random, tally: Tally) -> None:
    body = json.dumps({"prompt": " ".join(f"w{t}" for t in _prompt(rng)), "max_tokens": rng.randint(1, 8),
                       "temperature": 1.0, "top_k": 20, "seed": rng.randrange(1000)}).encode()
    status, _, answer = _request(port, "POST", "/v1/completions", body)
    tally.saw("sampled", status)
    if status == 200:
        with tally.lock:
            tally.admitted += 1
    elif status == 429:
        _back_off(rng)
    else:
        tally.problems.append(f"sampled request answered {status}: {answer[:200]!r}")


ACTIONS = [(_greedy, 40, {"stream": False}), (_greedy, 25, {"stream": True}), (_stream_and_hang_up, 8, {}),
           (_send_and_hang_up, 5, {}), (_hang_up_mid_body, 3, {}), (_malformed, 12, {}), (_sampled, 10, {}),
           (_oversized, 3, {}), (_slow, 2, {})]
# What the accounting below leaves out of "answered": refused before admission, or never a request.
HOSTILE = ("malformed", "hang-up whole", "hang-up mid-body", "oversized", "slow headers", "slow body")


def _client(port: int, seed: int, until: float, max_requests: int, counter: list[int], tally: Tally) -> None:
    rng = random.Random(seed)
    weights = [w for _, w, _ in ACTIONS]
    while time.monotonic() < until:
        with tally.lock:
            if counter[0] >= max_requests:
                return
            counter[0] += 1
        action, _, kwargs = rng.choices(ACTIONS, weights)[0]
        try:
            action(port, rng, tally, **kwargs)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            tally.problems.append(f"{action.__name__}: {type(exc).__name__}: {exc}")


def _wait_for(condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _load(port: int, pid: int, clients: int, seconds: float, max_requests: int,
          tally: Tally) -> tuple[int, float, float]:
    """Run the clients until `seconds` pass or they sent `max_requests`: how many they sent, in how long, and
    the peak RSS seen meanwhile."""
    counter, peak = [0], _rss_mib(pid)
    until = time.monotonic() + seconds
    started = time.monotonic()
    threads = [threading.Thread(target=_client, args=(port, 1000 + i, until, max_requests, counter, tally), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, _rss_mib(pid))
        time.sleep(0.2)
    return counter[0], time.monotonic() - started, peak


def _drained(port: int) -> bool:
    m = _metrics(port)
    return m["recipec_queue_depth"] == 0 and m["recipec_requests_running"] == 0


def soak(served, clients: int, seconds: float, max_requests: int) -> dict:
    port, proc = served["port"], served["proc"]
    # Warm-up: the same mix of traffic for a short while, then the largest shapes the load will use at once,
    # so that the RSS baseline includes what serving grows once and keeps for reuse (onnxruntime's arena at
    # those shapes, the tokenizer threads' malloc arenas, the interpreter's pools): what is measured
    # afterwards is what the load leaves behind.
    _load(port, proc.pid, clients, WARM_UP_S, max_requests, Tally())
    warm = [threading.Thread(target=_request, args=(port, "POST", "/v1/completions",
                                                    _body(list(range(3, 51)), 16, True)))
            for _ in range(MAX_BATCH)]
    for t in warm:
        t.start()
    for t in warm:
        t.join()
    _wait_for(lambda: _drained(port), "the warm-up to drain")
    time.sleep(1.0)
    rss_start = _rss_mib(proc.pid)
    before = _metrics(port)

    tally = Tally()
    sent, load_seconds, rss_peak = _load(port, proc.pid, clients, seconds, max_requests, tally)
    assert proc.poll() is None, f"the server died under load: {served['log'].read_text()[-3000:]}"
    assert not tally.problems, "\n".join(p[:300] for p in tally.problems[:10])

    # Every admitted request ends (hung-up ones as cancelled) and nothing stays queued or running.
    _wait_for(lambda: _drained(port), "the queue to drain")
    after = _metrics(port)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    finished = sum(v for k, v in delta.items() if k.startswith("recipec_requests_total{"))
    refused = delta['recipec_requests_rejected_total{reason="queue_full"}'] + \
        delta['recipec_requests_rejected_total{reason="client_queue_full"}']
    # Each well-formed request the clients saw answered was either admitted (and so finished, perhaps as
    # cancelled) or refused with 429. A whole request whose client hung up may also never reach the
    # handler (the disconnect can beat the body), so those count as "at most one each".
    answered = sum(n for (kind, _), n in tally.statuses.items() if kind not in HOSTILE)
    hung_up = tally.statuses[("hang-up whole", 0)]
    assert answered <= finished + refused <= answered + hung_up, (answered, hung_up, delta)
    assert finished >= tally.admitted
    assert delta['recipec_requests_rejected_total{reason="invalid"}'] == tally.malformed
    assert delta['recipec_requests_rejected_total{reason="too_large"}'] == tally.oversized
    assert delta['recipec_requests_rejected_total{reason="timeout"}'] == tally.stalled
    assert delta['recipec_requests_total{outcome="error"}'] == 0
    assert not [key for key in tally.statuses if key[1] >= 500], tally.statuses

    # Greedy tokens do not depend on what else shared the batch: serve each distinct request alone.
    expected: dict[tuple, list[int]] = {}
    for (prompt, max_tokens, ignore_eos), _ in tally.greedy:
        key = (prompt, max_tokens, ignore_eos)
        if key not in expected:
            status, _, answer = _request(port, "POST", "/v1/completions", _body(list(prompt), max_tokens, ignore_eos))
            assert status == 200, answer
            expected[key] = json.loads(answer)["choices"][0]["token_ids"]
    mismatched = [(k, got, expected[k]) for k, got in tally.greedy if got != expected[k]]
    assert not mismatched, f"{len(mismatched)} of {len(tally.greedy)} differ from the request served alone: {mismatched[:3]}"

    time.sleep(2.0)
    rss_end = _rss_mib(proc.pid)
    assert _request(port, "GET", "/health")[0] == 200 and proc.poll() is None
    figures = {"requests": sent, "load_seconds": round(load_seconds, 1), "greedy_checked": len(tally.greedy),
               "malformed": tally.malformed, "oversized": tally.oversized, "stalled": tally.stalled,
               "queue_full_429": int(refused),
               "statuses": {f"{kind} {status}": n for (kind, status), n in sorted(tally.statuses.items())},
               "outcomes": {k: int(v) for k, v in delta.items() if k.startswith("recipec_requests_total{")},
               "rss_start_mib": round(rss_start, 1), "rss_peak_mib": round(rss_peak, 1), "rss_end_mib": round(rss_end, 1)}
    print("soak figures:", json.dumps(figures, default=str))
    assert rss_end < rss_start * (1 + RSS_SLACK), figures
    log = served["log"].read_text()
    assert "Traceback" not in log, f"the server logged tracebacks under load: {log[-3000:]}"
    return figures


def test_soak(served):
    figures = soak(served, clients=12, seconds=10, max_requests=2000)
    assert figures["greedy_checked"] >= 20 and figures["malformed"] >= 5


@pytest.mark.slow
def test_soak_long(served):
    figures = soak(served, clients=24, seconds=60, max_requests=10000)
    assert figures["greedy_checked"] >= 100


def test_deeply_nested_json_is_a_400_not_a_500(served):
    status, _, answer = _request(served["port"], "POST", "/v1/completions", DEEP_JSON)
    assert status == 400, answer[:300]
    assert json.loads(answer)["error"]["type"] == "invalid_request_error"
    assert served["proc"].poll() is None


class _NextTokenModel:
    """A step model with no weights: next token = last + 1. Fast enough to serve thousands of requests."""

    class Cache:
        def __init__(self, rows: int, seq_len: int):
            self.rows, self.seq_len = rows, seq_len

        def select(self, keep):
            return _NextTokenModel.Cache(len(keep), self.seq_len)

        def merge(self, other):
            return _NextTokenModel.Cache(self.rows + other.rows, max(self.seq_len, other.seq_len))

    def _logits(self, last):
        import numpy as np

        out = np.zeros((len(last), VOCAB), dtype=np.float32)
        out[np.arange(len(last)), (np.asarray(last) + 1) % VOCAB] = 1.0
        return out

    def prefill(self, prompts):
        return self._logits([p[-1] for p in prompts]), self.Cache(len(prompts), max(map(len, prompts)))

    def decode(self, tokens, cache):
        return self._logits(tokens), self.Cache(cache.rows, cache.seq_len + 1)


def test_the_service_keeps_no_memory_per_request_served():
    """A few KiB kept per request would show in the soak's RSS only after hours; tracemalloc sees it now
    (it found the engine's step records, ~0.8 KiB per request, before servers stopped keeping them). The
    Service behind `recipec serve` (engine thread, sampling, metrics, handles), without HTTP and with a
    weightless model: after a warm-up, 2 000 more requests must leave no memory allocated by recipec
    behind (tracemalloc, filtered to recipec's files)."""
    import asyncio
    import gc
    import tracemalloc

    from recipec.runtime.engine import Policy
    from recipec.serve.protocol import Completion, ModelSpec, Sampling
    from recipec.serve.service import Service

    service = Service(_NextTokenModel(), ModelSpec("fake/baseline", VOCAB, None), Policy("continuous", max_batch_size=4),
                      max_queue=100_000)

    async def serve(n: int) -> None:
        handles = [service.submit(Completion([3 + i % 50] * (1 + i % 7), 1 + i % 16, Sampling(temperature=0.0),
                                             ignore_eos=True)) for i in range(n)]
        for handle in handles:
            while (await handle.events.get())[0] != "end":
                pass

    service.engine.start()
    # Tracing from the start, so that a container the warm-up grew and the second round reallocates at
    # the same size is not mistaken for new memory.
    tracemalloc.start()
    try:
        asyncio.run(serve(2000))  # the same burst first: containers reach the size 2 000 queued requests need
        gc.collect()
        before = tracemalloc.take_snapshot()
        asyncio.run(serve(2000))
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
        service.engine.stop()
    ours = [tracemalloc.Filter(True, "*/recipec/*")]
    # Memory kept per request means new blocks; a container that the second burst's timing resized in place
    # (a set's table doubling: same block count, 64 KiB more) is not kept per request.
    grown = [s for s in after.filter_traces(ours).compare_to(before.filter_traces(ours), "lineno")
             if s.size_diff > 0 and s.count_diff > 0]
    total = sum(s.size_diff for s in grown)
    where = "\n".join(f"{s.size_diff / 1024:.0f} KiB, {s.count_diff} blocks at {s.traceback.format()[-1].strip()}"
                      for s in sorted(grown, key=lambda s: -s.size_diff)[:3])
    assert total < 64 * 1024, f"{total / 1024:.0f} KiB kept after 2 000 requests:\n{where}"
