"""`recipec serve OUT/NAME`: serve a built variant over HTTP (recipec.serve)."""
from __future__ import annotations

import argparse
import ipaddress
import socket
from pathlib import Path

from recipec.cli.common import EXIT_OK, override_policy, run_guarded
from recipec.core import console
from recipec.core.builddir import command_manifest
from recipec.errors import UsageError
from recipec.runtime.engine import POLICIES, policy_from_serving
from recipec.serve.app import run_server
from recipec.serve.service import DEFAULT_MAX_QUEUE, build_service


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a built variant over HTTP (OpenAI-compatible /v1/completions)")
    _arguments(p)
    p.set_defaults(handler=cmd_serve)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("build_dir", type=Path, help="out/<name>")
    p.add_argument("--variant", default="baseline")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait for a batch slot; past it, 429 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the recipe's serving.device")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: the recipe's)")
    p.add_argument("--policy", choices=list(POLICIES), help="batching policy (default: the recipe's)")
    p.add_argument("--max-batch-size", type=int, help="default: the recipe's")
    p.add_argument("--max-wait-ms", type=float, help="dynamic batching's wait (default: the recipe's)")


def cmd_serve(args) -> int:
    if args.max_queue < 0:
        raise UsageError("--max-queue must be >= 0")
    _check_port(args.host, args.port)
    serving = command_manifest(args.build_dir, [args.variant])["recipe"]["resolved"].get("serving", {})
    policy = override_policy(policy_from_serving(serving), args, "serve")
    service = build_service(args.build_dir, args.variant, policy, args.device, args.threads, args.max_queue)
    if not _loopback(args.host):
        console.warn(f"listening on {args.host}: reachable from other machines, with no authentication")
    console.say(f"serving {service.spec.name} on http://{args.host}:{args.port} ({policy.batching} "
                f"batching, max batch {policy.max_batch_size}, max queue {args.max_queue}); Ctrl-C stops")
    run_server(service, args.host, args.port)
    console.say("stopped")
    return EXIT_OK


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
