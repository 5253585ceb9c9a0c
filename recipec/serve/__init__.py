"""`recipec serve`: an OpenAI-compatible server over the engine the profiler measures.

Endpoints: POST /v1/completions (prompts as text, a list of texts, token ids or lists of token ids;
max_tokens, temperature, top_p, top_k, seed, n, stop, stop_token_ids, logprobs, echo, ignore_eos, stream over
server-sent events), POST /v1/chat/completions (messages rendered by the model's chat template; the same
sampling, n, stop and chat's logprobs/top_logprobs), GET /v1/models and /v1/models/{id} (the model is
`<name>/<variant>` or just `<variant>`), GET /health (liveness), GET /ready (readiness: the engine runs a
step), GET /metrics (Prometheus text, recipec's or vLLM's names); /openapi.json only with --openapi.

Requests run on recipec.runtime.engine.Engine under the recipe's batching policy, on its own thread, one
engine request per choice (a request with n = 4 takes four batch slots); HTTP handlers run on uvicorn's
event loop and receive tokens through the engine's callbacks. echo's prompt log-probabilities come from one
forward over the prompt on a worker thread. Admission is bounded: requests waiting for a batch slot beyond
--max-queue, or beyond their client's share of it, are refused with 429 at once, rather than queueing
without limit while every client times out. A client that disconnects cancels its request, which leaves
its batch slot at the next step (continuous batching; static and dynamic batches carry finished rows to
their end by design). Before any of that, every request passes the guard: Host allow-list, API key,
framing, JSON content type, body size and timeouts (docs/deploy.md, "Running it for real").

The serving process imports neither torch nor transformers when the variant has a tokenizer.json.

Modules, each importing only those before it: protocol (request validation, OpenAI's error shape),
logprobs (log-probabilities of generated and prompt tokens), sampling (the engine choosing tokens by each
request's sampling parameters), metrics (/metrics), tokenizer (text in and out), chat (chat templates and
chat requests), limits (the limits and timeouts), service (admission, the engine thread's events,
deadlines, draining, prompt scoring, readiness), output (each choice's text, stop strings, logprobs
shapes), responses (whole and streamed answers), guard (the checks before the app), access_log (JSON
lines), app (the HTTP routes), server (uvicorn: header timeout, connection cap, graceful shutdown).
The command is recipec.cli.serve; measuring a server over HTTP is recipec.profile.remote.
"""
