"""`recipec serve`: an OpenAI-compatible completions server over the engine the profiler measures.

Endpoints: POST /v1/completions (prompt as text or token ids, max_tokens, temperature, top_p, top_k, seed,
ignore_eos, stream over server-sent events), GET /v1/models, GET /health (liveness), GET /ready (readiness:
the engine runs a step), GET /metrics (Prometheus text); /openapi.json only with --openapi.

Requests run on recipec.runtime.engine.Engine under the recipe's batching policy, on its own thread; HTTP
handlers run on uvicorn's event loop and receive tokens through the engine's callbacks. Admission is
bounded: requests waiting for a batch slot beyond --max-queue, or beyond their client's share of it, are
refused with 429 at once, rather than queueing without limit while every client times out. A client that
disconnects cancels its request, which leaves its batch slot at the next step (continuous batching; static
and dynamic batches carry finished rows to their end by design). Before any of that, every request passes
the guard: Host allow-list, API key, framing, JSON content type, body size and timeouts (docs/deploy.md,
"Running it for real").

The serving process imports neither torch nor transformers when the variant has a tokenizer.json.

Modules, each importing only those before it: protocol (request validation, OpenAI's error shape),
sampling (the engine choosing tokens by each request's sampling parameters), metrics (/metrics),
tokenizer (text in and out), limits (the limits and timeouts), service (admission, the engine thread's
events, deadlines, draining, readiness), guard (the checks before the app), access_log (JSON lines),
app (the HTTP routes), server (uvicorn: header timeout, connection cap, graceful shutdown).
The command is recipec.cli.serve; measuring a server over HTTP is recipec.profile.remote.
"""
