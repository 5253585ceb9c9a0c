"""`recipec serve OUT/NAME`: serve a built variant over HTTP (recipec.serve)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from recipec.cli.common import EXIT_OK, override_policy, run_guarded, speculation
from recipec.core import console
from recipec.core.builddir import command_manifest
from recipec.errors import UsageError
from recipec.runtime.engine import POLICIES, policy_from_serving
from recipec.serve.guard import LOOPBACK_NAMES, Access
from recipec.serve.limits import DEFAULT_MAX_QUEUE, Limits
from recipec.serve.metrics import METRIC_NAMES
from recipec.serve.server import run_server
from recipec.serve.service import build_service

API_KEY_ENV = "RECIPEC_API_KEY"
_DEFAULTS = Limits()


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a built variant over HTTP (OpenAI-compatible completions and chat)")
    _arguments(p)
    p.set_defaults(handler=cmd_serve)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("build_dir", type=Path, help="out/<name>")
    p.add_argument("--variant", default="baseline")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait for a batch slot; past it, 429 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-queue-per-client", type=int,
                   help="requests one client (API key, else address) may have waiting; past it, 429 "
                        "(default: half of --max-queue)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the recipe's serving.device")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: the recipe's)")
    p.add_argument("--policy", choices=list(POLICIES), help="batching policy (default: the recipe's)")
    p.add_argument("--max-batch-size", type=int, help="default: the recipe's")
    p.add_argument("--max-wait-ms", type=float, help="dynamic batching's wait (default: the recipe's)")
    p.add_argument("--speculative", choices=["ngram", "off"],
                   help="speculative decoding by prompt lookup in the engine; overrides the recipe's "
                        "serving.speculative (off: none; a draft model runs in recipec run only)")
    p.add_argument("--speculative-tokens", type=int, metavar="K",
                   help="tokens proposed per step (default: the recipe's, else 4)")
    p.add_argument("--chat-template", type=Path, metavar="FILE",
                   help="a Jinja chat template for /v1/chat/completions (default: the recipe's serving.chat_template, "
                        "else the tokenizer's own)")
    p.add_argument("--metric-names", choices=METRIC_NAMES, default="recipec",
                   help="/metrics under recipec's names, vLLM's (vllm:time_to_first_token_seconds …, for dashboards "
                        "built for vLLM) or both (default recipec)")
    _hardening_arguments(p)


def _hardening_arguments(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1/*; repeat for one key per client "
                        f"(default: ${API_KEY_ENV}, comma-separated keys; none: no authentication)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                   help="a Host header the server answers to; repeat for more, '*' for any (default: the "
                        "loopback names when --host is loopback, else any)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help=f"largest request body; past it, 413 before reading it (default {d.max_body_bytes})")
    p.add_argument("--max-prompt-chars", type=int,
                   help="longest text prompt, checked before tokenizing (default: 32 x the context length)")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help=f"open connections; past it, 503 (default {d.max_connections})")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help=f"seconds for a request's headers to arrive (default {d.header_timeout:g})")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help=f"seconds for a request's body to arrive; past it, 408 (default {d.body_timeout:g})")
    p.add_argument("--keep-alive-timeout", type=int, default=d.keep_alive_timeout,
                   help=f"seconds an idle connection stays open (default {d.keep_alive_timeout})")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help=f"seconds a request may take from admission to its last token; past it, 504 or an SSE "
                        f"error event (default {d.request_timeout:g})")
    p.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace,
                   help=f"seconds running requests may finish after SIGTERM/SIGINT (default {d.shutdown_grace:g})")
    p.add_argument("--access-log", metavar="PATH",
                   help="append one JSON line per request to PATH ('-': stdout); default: no access log")
    p.add_argument("--openapi", action="store_true", help="serve the OpenAI-style schema at /openapi.json")


def cmd_serve(args) -> int:
    limits = _limits(args)
    access = Access(_allowed_hosts(args.host, args.allowed_host), _api_keys(args.api_key))
    _check_port(args.host, args.port)
    serving = command_manifest(args.build_dir, [args.variant])["recipe"]["resolved"].get("serving", {})
    policy = override_policy(policy_from_serving(serving), args, "serve")
    spec = speculation(args, serving)
    if spec is not None and spec.method != "ngram":
        console.warn(f"serving.speculative is {spec.method}: the server's engine speculates by prompt lookup only "
                     "(--speculative ngram); serving without speculation")
        spec = None
    template = _chat_template(args.chat_template)
    log = _access_log(args.access_log)  # before loading the model: a bad path fails at once
    try:
        service = build_service(args.build_dir, args.variant, policy, args.device, args.threads, args.max_queue,
                                args.max_queue_per_client, limits.request_timeout, template, args.metric_names,
                                spec)
        if not _loopback(args.host):
            console.warn(f"listening on {args.host}: reachable from other machines, "
                         + ("without TLS: put a TLS proxy in front (docs/deploy.md)" if access.api_keys
                            else "with no authentication (--api-key) and no TLS (docs/deploy.md)"))
        console.say(f"serving {service.spec.name} on http://{args.host}:{args.port} ({policy.batching} "
                    f"batching, max batch {policy.max_batch_size}, max queue {args.max_queue}, "
                    f"{service.per_client} per client{', API keys on' if access.api_keys else ''}"
                    + (f", speculative ngram K={spec.tokens}" if service.engine.speculation else "") + "); Ctrl-C stops")
        if spec is not None and service.engine.speculation is None:
            console.warn("this variant's graph has no shared KV buffer (fuse kv_buffer: shared), which speculation in "
                         "the engine needs; serving without speculation")
        chat = service.spec.chat_template
        console.say(f"chat template: {chat.origin}" if chat is not None else
                    "no chat template: /v1/chat/completions answers 400 (--chat-template FILE gives one)")
        run_server(service, args.host, args.port, limits, access, args.openapi, log)
    finally:
        if log is not None and log is not sys.stdout:
            log.close()
    console.say("stopped")
    return EXIT_OK


def _limits(args) -> Limits:
    if args.max_queue < 0:
        raise UsageError("--max-queue must be >= 0")
    if args.max_queue_per_client is not None and args.max_queue_per_client < 1:
        raise UsageError("--max-queue-per-client must be >= 1")
    limits = Limits(args.max_body_bytes, args.max_prompt_chars, args.header_timeout, args.body_timeout,
                    args.keep_alive_timeout, args.request_timeout, args.max_connections, args.shutdown_grace)
    problems = limits.check()
    if problems:
        raise UsageError("; ".join(problems))
    return limits


def _api_keys(given: list[str]) -> tuple[str, ...]:
    keys = given or [k for k in os.environ.get(API_KEY_ENV, "").split(",")]
    keys = [k.strip() for k in keys if k.strip()]
    bad = [k for k in keys if any(c.isspace() or not c.isprintable() or not c.isascii() for c in k)]
    if bad:
        raise UsageError(f"an API key must be printable ASCII without spaces (one of --api-key/${API_KEY_ENV} is not)")
    return tuple(keys)


def _allowed_hosts(host: str, given: list[str]) -> frozenset[str] | None:
    if "*" in given:
        return None
    if given:
        return frozenset(h.strip().lower().strip("[]") for h in given)
    # Loopback: a browser on this machine is the only client, and DNS rebinding its way in sends another name.
    return LOOPBACK_NAMES | {host.lower().strip("[]")} if _loopback(host) else None


def _chat_template(path: Path | None) -> tuple[str, str] | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8"), f"--chat-template {path}"
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --chat-template {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _access_log(path: str | None):
    if path is None:
        return None
    if path == "-":
        return sys.stdout
    try:
        return open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot open the access log {path}: {exc.strerror or exc}") from None


def _check_port(host: str, port: int) -> None:
    """uvicorn reports a taken port only in its log and exits; say it plainly before loading the model."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """The serve command alone, with recipec's error handling, as `recipec serve ARGV` runs it."""
    parser = argparse.ArgumentParser(prog="recipec serve", description="serve a built variant over HTTP")
    _arguments(parser)
    args = parser.parse_args(argv)
    return run_guarded(lambda: cmd_serve(args))
